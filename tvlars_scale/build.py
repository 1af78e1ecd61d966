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

from collections.abc import Callable
from functools import partial

import torch
from accelerate import Accelerator
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
    open_streaming,
)
from tvlars_scale.models import ModelError
from tvlars_scale.optim import OPTIMIZERS, layerwise_param_groups, schedules
from tvlars_scale.tasks import Task

__all__ = [
    "batch_plan",
    "image_data",
    "loaders",
    "lr_schedule",
    "model",
    "optimizer",
    "peak_lr",
]

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


def image_data(config: Config) -> ImageData | StreamingData:
    """The dataset named by ``data``: decoded once into uint8 tensors, or opened for streaming
    (labels and file index only; ``data.storage``)."""
    data = config.data
    try:
        if data.streams():
            info = DATASETS[data.name]
            source = data.path or info.hub_id
            return open_streaming(data.name, source, data.image_size or info.image_size)
        return load_image_data(
            data.name,
            path=data.path,
            num_synthetic=data.num_synthetic,
            image_size=data.image_size,
            seed=config.run.seed,
        )
    except DataError as error:
        raise ConfigError("data.path" if data.path else "data.name", str(error)) from None


def loaders(
    data: ImageData | StreamingData,
    plan: BatchPlan,
    accelerator: Accelerator,
    seed: int,
    data_config: DataConfig | None = None,
) -> tuple[MicroBatchLoader | StreamingLoader, MicroBatchLoader | StreamingLoader]:
    """This rank's shuffled training micro-batches (whole steps only) and its evaluation shard.

    Streaming data (``data_config`` then sets the workers, crops and bad-image policy) is read
    from disk by worker processes; in-memory data is gathered from tensors.
    """
    if len(data.train_labels) < plan.global_batch_size:
        raise ConfigError(
            "batch.global_batch_size",
            f"{plan.global_batch_size} is larger than the {data.name} training set "
            f"({len(data.train_labels)} samples): not one optimizer step per epoch",
        )
    device, rank = accelerator.device, accelerator.process_index
    split = (plan.micro_batch_size, rank, plan.world_size)
    if isinstance(data, StreamingData):
        return _streaming_loaders(data, plan, device, rank, seed, data_config or DataConfig())
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
        data.image_size, train=True, seed=seed, crop_scale=tuple(cfg.crop_scale), flip=cfg.flip
    )
    eval_transform = Transform(data.image_size, train=False, eval_resize=cfg.eval_resize)
    split = (plan.micro_batch_size, rank, plan.world_size)
    train = StreamingLoader(
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
    evaluation = StreamingLoader(
        data.test, eval_transform, *split, shuffle=False, drop_last=False, **workers
    )
    return train, evaluation


def model(config: Config, task: Task, accelerator: Accelerator) -> nn.Module:
    """The task's network, freshly initialised on the CPU (call after seeding)."""
    cpu_ranks = accelerator.device.type == "cpu" and accelerator.num_processes > 1
    if config.model.sync_batchnorm and cpu_ranks:
        raise ConfigError(
            "model.sync_batchnorm", "PyTorch synchronises batch norm on GPUs only, not on CPU"
        )
    try:
        return task.build_model()
    except ModelError as error:
        raise ConfigError("model.name", str(error)) from None


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

    The section's fields are the constructor's arguments (``sgd`` and ``adamw`` are torch's own);
    the one epoch-valued field, TVLARS' ``delay_epochs`` (both variants), becomes ``delay_steps``
    from the real steps per epoch.
    """
    kwargs = optim.model_dump(exclude={"name"})
    kwargs["lr"] = lr
    if "delay_epochs" in kwargs:
        kwargs["delay_steps"] = epochs_to_steps(kwargs.pop("delay_epochs"), steps_per_epoch)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    groups = layerwise_param_groups(network, optim.weight_decay)
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
