"""The build phase: each config section becomes its component once, before the loop.

The trainer calls these in order in ``setup()`` and reads no config afterwards:

* ``batch`` + world size -> :class:`~tvlars_scale.batching.BatchPlan` (:func:`batch_plan`);
* ``data`` -> the decoded dataset (:func:`image_data`) and its train / eval loaders (:func:`loaders`);
* ``task`` + ``model`` -> the task (:func:`~tvlars_scale.tasks.build_task`) and its network
  (:func:`model`);
* ``optim`` -> the optimizer with its LR already scaled from the batch plan (:func:`peak_lr`,
  :func:`optimizer`): each ``optim.name`` section holds exactly its optimizer's constructor
  arguments, so they are passed through as they are;
* ``schedule`` -> the LR as a plain function of the optimizer step (:func:`lr_schedule`).

Every user error becomes a :class:`~tvlars_scale.config.ConfigError` naming the key.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn

from tvlars_scale.batching import BatchPlan, epochs_to_steps, plan_batches, scale_lr
from tvlars_scale.config import Config, ConfigError, DataConfig, OptimConfig, ScheduleConfig
from tvlars_scale.data import (
    DATASETS,
    DataError,
    ImageData,
    MicroBatchLoader,
    StreamingData,
    StreamingLoader,
    Transform,
    load_image_data,
)
from tvlars_scale.data.dali_decode import DaliStreamingLoader
from tvlars_scale.data.policies import SampleAugment
from tvlars_scale.data.ssl_decode import TwoViewTransform
from tvlars_scale.data.ssl_views import barlow_twins_recipe
from tvlars_scale.data.streaming import open_prepared, prepare_streaming
from tvlars_scale.models import ModelError
from tvlars_scale.optim import OPTIMIZERS, layerwise_param_groups, schedules
from tvlars_scale.tasks import Task
from tvlars_scale.training.init_from import load_initial_weights

__all__ = [
    "LOOP_OPTIM_KEYS",
    "batch_plan",
    "image_data",
    "loaders",
    "lr_schedule",
    "model",
    "optimizer",
    "peak_lr",
]

LOOP_OPTIM_KEYS = {"name", "grad_clip"}
"""``optim`` keys the loop reads, not the optimizer's constructor (the loop clips: training.clip)."""

# optim.name -> constructor taking (param groups, **the section's fields).
_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    **OPTIMIZERS,
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
}


def batch_plan(config: Config, world_size: int) -> BatchPlan:
    """``global = micro x accumulation x ranks`` for the world size the run was launched with
    (micro batches differing by one sample where it does not divide)."""
    return plan_batches(config.batch.global_batch_size, config.batch.micro_batch_size, world_size)


def image_data(config: Config, accelerator: Accelerator | None = None) -> ImageData | StreamingData:
    """The dataset named by ``data``: decoded once into uint8 tensors, or opened for streaming
    (labels and file index only; ``data.storage``).

    Under several processes the main process goes first -- it lists an image-folder tree into its
    index file (unless a fresh one is there) or fills the ``datasets`` cache -- and the others then
    map that index or load from that cache: no other rank lists the tree or downloads. Streaming,
    one small collective then checks that every rank holds the same (sizes, content hash).
    ``accelerator`` None: this process alone.
    """
    data = config.data
    try:
        if data.streams():
            info = DATASETS[data.name]
            source = data.path or info.hub_id
            size = data.image_size or info.image_size

            def prepare() -> str:
                return prepare_streaming(data.name, source, data.index, say=_say_on_stderr)

            def open_source(kind: str) -> StreamingData:
                return open_prepared(data.name, source, size, kind, data.index)

            streamed, failed = None, None
            try:
                streamed = _main_process_first(accelerator, prepare, open_source)
            except DataError as error:  # still in the check: no rank waits for this one
                failed = error
            disagreement = _check_same_dataset(accelerator, data.name, streamed)
            if failed or disagreement:
                raise failed or DataError(disagreement)
            return streamed
        return _main_process_first(
            accelerator,
            lambda: None,
            lambda _: load_image_data(
                data.name,
                path=data.path,
                num_synthetic=data.num_synthetic,
                image_size=data.image_size,
                seed=config.run.seed,
            ),
        )
    except DataError as error:
        raise ConfigError("data.path" if data.path else "data.name", str(error)) from None


def _say_on_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _main_process_first(
    accelerator: Accelerator | None, prepare: Callable[[], Any], load: Callable[[Any], Any]
) -> Any:
    """``load(prepare())`` on the main process, THEN ``load`` of what it prepared on the others.

    Accelerate's ``main_process_first`` would leave the others waiting at its barrier when the main
    process fails (a bad path: every rank hangs until the collective timeout); here the main
    process's outcome is broadcast and its error raised on every rank alike.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return load(prepare())
    outcome = None
    if accelerator.is_main_process:
        try:
            prepared = prepare()
            loaded = load(prepared)
            outcome = ("ok", prepared)
        except DataError as error:
            outcome = ("error", str(error))
        except Exception as error:
            outcome = ("failed", f"the main process failed to load the data: {error!r}")
            # collective: broadcast of the outcome, so that the others stop too (below).
            broadcast_object_list([outcome])
            raise
    # collective: broadcast of the main process's outcome (a picklable value or an error line);
    # it is also the barrier that orders the loads.
    [outcome] = broadcast_object_list([outcome])
    status, value = outcome
    if status == "error":
        raise DataError(value)
    if status == "failed":
        raise RuntimeError(value)
    return loaded if accelerator.is_main_process else load(value)


def _check_same_dataset(
    accelerator: Accelerator | None, name: str, data: StreamingData | None
) -> str | None:
    """Whether every rank holds the same (train size, test size, content hash) -- None -- or how
    they differ: one all_reduce of six int64 (the maxima of the keys and of their negations, so
    min == max on every field). A rank that could not open the data (None) takes part too."""
    if accelerator is None or accelerator.num_processes == 1:
        return None
    key = torch.tensor(data.key if data else (-1, -1, 0), dtype=torch.int64)
    extremes = torch.cat([key, -key]).to(accelerator.device)
    # collective: all_reduce(MAX) of six int64, once at start-up.
    torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
    high, low = extremes[:3].tolist(), (-extremes[3:]).tolist()  # host sync: once at start-up
    if high == low:
        return None
    if low[0] < 0:
        return f"{name}: another rank could not open the dataset (its error is in its log)"
    contents = "; their contents differ" if high[2] != low[2] else ""
    return (
        f"{name}: the ranks opened different datasets ({low[0]}..{high[0]} train, "
        f"{low[1]}..{high[1]} test images{contents}): data.path and data.index must name the "
        "same files on every rank"
    )


def loaders(
    data: ImageData | StreamingData,
    plan: BatchPlan,
    accelerator: Accelerator,
    seed: int,
    data_config: DataConfig | None = None,
    task: str = "classification",
) -> tuple[MicroBatchLoader | StreamingLoader, MicroBatchLoader | StreamingLoader]:
    """This rank's shuffled training micro-batches (whole steps only) and its evaluation shard.

    Streaming data (``data_config`` then sets the workers, crops and bad-image policy) is read
    from disk by worker processes, two views per sample for ``task`` barlow_twins; in-memory
    data is gathered from tensors.
    """
    if len(data.train_labels) < plan.global_batch_size:
        raise ConfigError(
            "batch.global_batch_size",
            f"{plan.global_batch_size} is larger than the {data.name} training set "
            f"({len(data.train_labels)} samples): not one optimizer step per epoch",
        )
    device, rank = accelerator.device, accelerator.process_index
    split = (plan.micro_batch_size, rank, plan.world_size)
    data_config = data_config or DataConfig()
    augment = None if data_config.augment == "none" else SampleAugment(data_config.augment)
    if isinstance(data, StreamingData):
        return _streaming_loaders(data, plan, device, rank, seed, data_config, augment, task)
    # The decoded dataset lives on the training device: micro-batches are then gathered there,
    # with no host-to-device copy per step (a no-op on the CPU).
    train = MicroBatchLoader(
        data.train_images.to(device),
        data.train_labels.to(device),
        *split,
        shuffle=True,
        seed=seed,
        drop_last=True,
        grad_accum_steps=plan.grad_accum_steps,
        global_batch_size=plan.global_batch_size,
        sample_augment=augment,
    )
    evaluation = MicroBatchLoader(
        data.test_images.to(device),
        data.test_labels.to(device),
        *split,
        shuffle=False,
        drop_last=False,
    )
    return train, evaluation


def _streaming_loaders(
    data: StreamingData,
    plan: BatchPlan,
    device: torch.device,
    rank: int,
    seed: int,
    cfg: DataConfig,
    augment: SampleAugment | None,
    task: str,
) -> tuple[StreamingLoader, StreamingLoader]:
    workers = {
        "num_workers": cfg.num_workers,
        "prefetch_factor": cfg.prefetch_factor,
        "bad_images": cfg.bad_images,
        "device": device,
    }
    # The augmentation seed is the run seed, NOT seed + rank: a sample's crop is a function of
    # (seed, epoch, index), the same whichever rank decodes it.
    train_transform = Transform(
        data.image_size,
        train=True,
        seed=seed,
        crop_scale=tuple(cfg.crop_scale),
        flip=cfg.flip,
        augment=augment,
    )
    if task == "barlow_twins":
        recipe = barlow_twins_recipe(
            data.image_size, data.mean, data.std, flip=cfg.flip, crop_scale=cfg.crop_scale
        )
        train_transform = TwoViewTransform(recipe, seed=seed)
    eval_transform = Transform(data.image_size, train=False, eval_resize=cfg.eval_resize)
    split = (plan.micro_batch_size, rank, plan.world_size)
    loader_class = DaliStreamingLoader if cfg.decoder == "dali" else StreamingLoader
    train = loader_class(
        data.train,
        train_transform,
        *split,
        shuffle=True,
        seed=seed,
        drop_last=True,
        grad_accum_steps=plan.grad_accum_steps,
        global_batch_size=plan.global_batch_size,
        **workers,
    )
    evaluation = loader_class(
        data.test, eval_transform, *split, shuffle=False, drop_last=False, **workers
    )
    return train, evaluation


def model(
    config: Config, task: Task, accelerator: Accelerator, *, resuming: bool = False
) -> nn.Module:
    """The task's network on the CPU, freshly initialised (call after seeding), then loaded from
    ``model.init_from`` when set (:mod:`tvlars_scale.training.init_from`) unless ``resuming`` (the
    checkpoint's weights replace it)."""
    cpu_ranks = accelerator.device.type == "cpu" and accelerator.num_processes > 1
    if config.model.sync_batchnorm and cpu_ranks:
        raise ConfigError(
            "model.sync_batchnorm", "PyTorch synchronises batch norm on GPUs only, not on CPU"
        )
    try:
        network = task.build_model()
    except ModelError as error:
        raise ConfigError("model.name", str(error)) from None
    if config.model.init_from is not None and not resuming:
        for line in load_initial_weights(network, config.model.init_from):
            accelerator.print(line)
    return network


def peak_lr(config: Config, plan: BatchPlan) -> float:
    """``optim.lr`` scaled from ``batch.base_batch_size`` to the plan's global batch."""
    batch = config.batch
    return scale_lr(
        config.optim.lr, batch.lr_scaling, plan.global_batch_size, batch.base_batch_size
    )


def optimizer(
    optim: OptimConfig, network: nn.Module, lr: float, steps_per_epoch: int
) -> torch.optim.Optimizer:
    """``optim.name``'s optimizer over the usual two parameter groups (decayed / not), at ``lr``.

    The section's fields but ``grad_clip`` are the constructor's arguments (``sgd`` and ``adamw``
    are torch's own);
    the one epoch-valued field, TVLARS' ``delay_epochs`` (both variants), becomes ``delay_steps``
    from the real steps per epoch.
    """
    kwargs = optim.model_dump(exclude=LOOP_OPTIM_KEYS)
    kwargs["lr"] = lr
    if "delay_epochs" in kwargs:
        kwargs["delay_steps"] = epochs_to_steps(kwargs.pop("delay_epochs"), steps_per_epoch)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    # The layer-wise optimizers' exclude_1d decides the groups too (SGD / AdamW: always two groups).
    exclude_1d = kwargs.get("exclude_1d", True)
    groups = layerwise_param_groups(network, optim.weight_decay, exclude_1d=exclude_1d)
    return _OPTIMIZERS[optim.name](groups, **kwargs)


def lr_schedule(
    schedule: ScheduleConfig, lr: float, steps_per_epoch: int, total_steps: int
) -> Callable[[int], float]:
    """The learning rate at optimizer step ``t``: ``lr`` times the schedule's multiplier."""
    if schedule.name == "warmup_cosine":
        multiplier = partial(
            schedules.warmup_cosine,
            total_steps=total_steps,
            warmup_steps=epochs_to_steps(schedule.warmup_epochs, steps_per_epoch),
            min_ratio=schedule.min_lr_ratio,
        )
    elif schedule.name == "poly":
        multiplier = _warmup_poly(
            total_steps,
            epochs_to_steps(schedule.warmup_epochs, steps_per_epoch),
            schedule.power,
            schedule.min_lr_ratio,
        )
    else:  # constant: TVLARS' phi_t is its schedule
        return lambda step: lr
    return lambda step: lr * multiplier(step)


def _warmup_poly(
    total_steps: int, warmup_steps: int, power: float, min_ratio: float
) -> Callable[[int], float]:
    """Linear warm-up (``(t + 1) / W``, as warmup_cosine's) then polynomial decay over the steps
    left; with ``W = 0`` exactly :func:`schedules.polynomial_decay`."""
    decay = partial(
        schedules.polynomial_decay,
        total_steps=total_steps - warmup_steps,
        power=power,
        min_ratio=min_ratio,
    )
    if warmup_steps == 0:
        return decay
    return lambda step: (
        (step + 1) / warmup_steps if step < warmup_steps else decay(step - warmup_steps)
    )
