"""Accelerate and DeepSpeed set up for a batch plan: the processes, the batch the engine runs, autocast,
and one optimizer step's gradient accumulation.

Under DeepSpeed the trainer, not the JSON, decides the batch: :func:`put_plan_into_deepspeed` writes
the plan into the plugin's config before ``prepare`` (a JSON value that disagrees is refused), and
:func:`check_engine_plan` asks the engine afterwards what it really runs (Accelerate only warns).
Accelerate's DeepSpeed optimizer wrapper's ``step()`` is a no-op: the engine steps inside the last
micro-batch's backward. :func:`prepare` then binds a layer-wise optimizer to the ZeRO partitions it
is handed (``bind_zero``), so its per-layer norms cover whole layers.

Under PyTorch FSDP2 (an Accelerate config with ``distributed_type: FSDP`` and ``fsdp_version: 2``)
the plugin is built here: its mixed-precision policy comes from ``run.mixed_precision`` (weights
all-gathered in bf16/fp16, gradients reduced and outputs returned in fp32; the sharded fp32 weights
stay the optimizer's master weights), and on CPU ranks, where Accelerate would fall back to DDP, the
state is switched to FSDP (FSDP2 runs on gloo). :func:`prepare` binds a layer-wise optimizer to the
DTensor shards (``bind_fsdp``).

:func:`make_trackers` builds Accelerate's experiment trackers for ``run.trackers``, each told where
to write (one instance per tracker: ``init_trackers`` would give them all one project name).
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
    is_mlflow_available,
    is_tensorboard_available,
    is_wandb_available,
)
from torch import Tensor, nn

from tvlars_scale import fault_injection
from tvlars_scale.batching import BatchPlan
from tvlars_scale.config import Config, ConfigError
from tvlars_scale.nonfinite import check_deepspeed_skips_nonfinite
from tvlars_scale.optim import bind_fsdp, bind_zero
from tvlars_scale.run_dir import MLFLOW_ARTIFACTS_DIR, MLFLOW_DB, TENSORBOARD_DIR
from tvlars_scale.training import levers

__all__ = [
    "StepAccumulation",
    "check_engine_plan",
    "deepspeed_autocast",
    "make_accelerator",
    "make_trackers",
    "prepare",
    "put_plan_into_deepspeed",
    "reduce_gradients_in_fp32",
    "start_trackers",
]


def make_accelerator(config: Config) -> Accelerator:
    precision = config.run.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("run.mixed_precision", "fp16 needs a GPU; use bf16 on the CPU")
    group, cpu = {}, False
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not torch.cuda.is_available() and distributed:
        # Without the gloo handler Accelerate reports num_processes == 1 on every CPU rank: with no
        # GPU it names no process-group backend, and it treats "no backend" as no distributed
        # training. With the handler and a single process, Accelerate asks for a process group
        # that does not exist.
        group["backend"] = "gloo"
        # Without cpu=True several CPU processes get DistributedType.NO: no DDP wrapper, so no
        # gradient all-reduce. DeepSpeed must not get it (Accelerate then skips its init).
        cpu = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
    if distributed and config.run.collective_timeout_s is not None:
        # A rank that waits this long in a collective raises, so one hung or lost rank ends the
        # whole job instead of holding every GPU. Accelerate hands it to init_process_group, and
        # under DeepSpeed to deepspeed.init_distributed, which creates the group there.
        group["timeout"] = timedelta(seconds=config.run.collective_timeout_s)
    handlers = [InitProcessGroupKwargs(**group)] if group else []
    fsdp_plugin = fsdp2_plugin(precision)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        log_with=make_trackers(config) or None,
        project_dir=config.run.output_dir,
        kwargs_handlers=handlers,
        fsdp_plugin=fsdp_plugin,
    )
    if fsdp_plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # Accelerate chooses FSDP only on GPU-like backends and would run these CPU ranks as DDP.
        # FSDP2 itself runs on gloo: switch the state the way Accelerate does on GPUs, in both
        # shared states (a later AcceleratorState() copies PartialState's distributed_type back).
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = fsdp_plugin
        PartialState().distributed_type = DistributedType.FSDP
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        raise RuntimeError(
            f"{accelerator.num_processes} processes but Accelerate chose no distributed mode: "
            "gradients would not be synchronised"
        )
    return accelerator


_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fsdp2_plugin(precision: str) -> FullyShardedDataParallelPlugin | None:
    """The FSDP2 plugin ``accelerate launch`` asked for (``ACCELERATE_USE_FSDP`` and the ``FSDP_*``
    variables it sets from the config file), with the mixed-precision policy of ``precision``;
    ``None`` without FSDP. FSDP1 is refused: its flat parameters hide the layers."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError(
            "fsdp_config.fsdp_version",
            f"is {plugin.fsdp_version}; the layer-wise optimizers need FSDP2 (fsdp_version: 2)",
        )
    if precision in _HALF:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # Half-precision compute; fp32 gradient reduction and outputs (the loss), like autocast.
        plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=_HALF[precision], reduce_dtype=torch.float32, output_dtype=torch.float32
        )
    return plugin


TRACKER_PROJECT = "tvlars_scale"
"""The wandb project (unless WANDB_PROJECT is set) and the MLflow experiment."""

_INSTALLED = {
    "tensorboard": is_tensorboard_available,
    "wandb": is_wandb_available,
    "mlflow": is_mlflow_available,
}


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(module) is not None for module in modules)


class _MLflowTracker(MLflowTracker):
    """Accelerate's MLflow tracker on a given store (Accelerate's own uses mlflow's global one)."""

    def __init__(self, tracking_uri: str, **kwargs):
        super().__init__(**kwargs)
        self.tracking_uri = tracking_uri

    def start(self):
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        super().start()


def make_trackers(config: Config) -> list[GeneralTracker]:
    """Accelerate's trackers for ``run.trackers`` (where each writes: the field's doc). They write
    nothing until ``accelerator.init_trackers`` starts them on the main process. A tracker that is
    not installed is refused here (Accelerate would silently leave it out)."""
    output_dir = Path(config.run.output_dir).resolve()
    trackers: list[GeneralTracker] = []
    for name in config.run.trackers:
        if not _INSTALLED[name]():
            raise ConfigError("run.trackers", f"{name} is not installed (pip install {name})")
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(TENSORBOARD_DIR, output_dir))
        elif name == "wandb":
            # WANDB_MODE (online, offline...) is read by wandb.init itself.
            project = os.environ.get("WANDB_PROJECT") or TRACKER_PROJECT
            trackers.append(WandBTracker(project, dir=str(output_dir), name=output_dir.name))
        else:
            trackers.append(_mlflow_tracker(output_dir))
    return trackers


def start_trackers(accelerator: Accelerator, hparams: dict) -> None:
    """Start the trackers of :func:`make_trackers` (none: nothing happens) with ``hparams`` as
    their hyper-parameters; on the main process only."""
    # The project name goes to trackers named by a string; ours were built with their own.
    accelerator.init_trackers(TRACKER_PROJECT, config=hparams)


def _mlflow_tracker(output_dir: Path) -> MLflowTracker:
    uri, artifacts = os.environ.get("MLFLOW_TRACKING_URI"), None
    if not uri:
        # A store in the run directory. Not mlflow's file store (./mlruns): mlflow 3 refuses it
        # unless MLFLOW_ALLOW_FILE_STORE=true. Its sqlite store needs SQLAlchemy and alembic, which
        # mlflow brings and mlflow-skinny does not.
        if not _installed("sqlalchemy", "alembic"):
            raise ConfigError(
                "run.trackers",
                f"mlflow's store sqlite:///<output_dir>/{MLFLOW_DB} needs SQLAlchemy and alembic "
                "(pip install mlflow, or mlflow-skinny sqlalchemy alembic); or set "
                "MLFLOW_TRACKING_URI",
            )
        uri = f"sqlite:///{output_dir / MLFLOW_DB}"
        artifacts = str(output_dir / MLFLOW_ARTIFACTS_DIR)
    return _MLflowTracker(
        uri, experiment_name=TRACKER_PROJECT, logging_dir=artifacts, run_name=output_dir.name
    )


def deepspeed_train_batch_size(plan: BatchPlan) -> int:
    """What DeepSpeed is told its train batch is: it requires ``micro x accumulation x world``
    (its config check), so an uneven plan gives it its upper bound, one sample more on the ranks
    that take one less. DeepSpeed only counts samples and times throughput with it; the
    gradient (accumulation scaling, data-parallel mean) does not depend on it."""
    return plan.micro_batch_size * plan.grad_accum_steps * plan.world_size


def put_plan_into_deepspeed(
    accelerator: Accelerator, plan: BatchPlan, grad_clip: float | None = None
) -> None:
    """Write the batch plan and ``optim.grad_clip`` into the DeepSpeed config; refuse a config file
    that disagrees."""
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "train_batch_size": deepspeed_train_batch_size(plan),
    }
    for key, value in wanted.items():
        current = ds_config.get(key, "auto")
        if current not in ("auto", value):
            raise ConfigError(
                f"deepspeed.{key}",
                f"the DeepSpeed config says {current} but {plan.describe()} needs {value}; "
                'set it to "auto"',
            )
        ds_config[key] = value
    # DeepSpeed clips as optim.grad_clip says, like the other paths (training.clip). The shipped
    # JSONs say 0.0, not "auto": Accelerate alone fills "auto" with 1.0 and would silently clip.
    # 0 or "auto" in the JSON leave it to optim.grad_clip; another number must agree with it.
    clip = grad_clip or 0.0
    current = ds_config.get("gradient_clipping", "auto")
    if current not in ("auto", 0, clip):
        raise ConfigError(
            "deepspeed.gradient_clipping",
            f"the DeepSpeed config says {current} but optim.grad_clip is {grad_clip}; set it to "
            "0.0 (optim.grad_clip drives it)",
        )
    ds_config["gradient_clipping"] = clip


def reduce_gradients_in_fp32(accelerator: Accelerator) -> None:
    """Under bf16 / fp16 DeepSpeed all-reduces (ZeRO-2/3: reduce-scatters) the half-precision
    gradients in half precision unless told otherwise: the sum over W ranks then rounds to 8 (bf16)
    bits of mantissa, ever coarser as W grows. Reduce them in fp32, as FSDP2's policy here does
    (``reduce_dtype=float32``); a DeepSpeed config that names ``communication_data_type`` keeps it."""
    if accelerator.mixed_precision in _HALF:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config.setdefault("communication_data_type", "fp32")


def deepspeed_autocast(engine) -> AbstractContextManager:
    """bf16/fp16 under DeepSpeed: the engine holds half-precision weights but does not cast the
    inputs; autocast does. (One process and DDP keep fp32 weights, and Accelerate autocasts.)"""
    if engine.bfloat16_enabled():
        return torch.autocast(engine.device.type, dtype=torch.bfloat16)
    if engine.fp16_enabled():
        return torch.autocast(engine.device.type, dtype=torch.float16)
    return nullcontext()


def check_engine_plan(engine, accelerator: Accelerator, plan: BatchPlan) -> None:
    """Ask the DeepSpeed engine what it really runs (Accelerate only warns on a mismatch)."""
    actual = (
        engine.train_micro_batch_size_per_gpu(),
        engine.gradient_accumulation_steps(),
        engine.train_batch_size(),
        accelerator.gradient_accumulation_steps,
    )
    expected = (
        plan.micro_batch_size,
        plan.grad_accum_steps,
        deepspeed_train_batch_size(plan),
        plan.grad_accum_steps,
    )
    if actual != expected:
        raise RuntimeError(
            f"DeepSpeed runs micro batch {actual[0]}, accumulation {actual[1]}, train batch "
            f"{actual[2]} (Accelerate accumulation {actual[3]}), not {plan.describe()}"
        )


def prepare(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: BatchPlan,
    config: Config | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, AbstractContextManager]:
    """``accelerator.prepare`` with the plan put into DeepSpeed and checked, the layer-wise
    optimizer bound to its ZeRO partitions or FSDP2 shards; returns the prepared model and optimizer and the extra
    autocast the forward passes need (only DeepSpeed's half precision needs one). ``config``'s
    ``model.channels_last`` and ``run.compile`` are applied around it (:mod:`tvlars_scale.training.levers`)."""
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:
        put_plan_into_deepspeed(accelerator, plan, config.optim.grad_clip if config else None)
        reduce_gradients_in_fp32(accelerator)
    run = config.run if config is not None else None
    if config is not None and config.model.channels_last:
        levers.to_channels_last(model, accelerator)
    if run is not None and run.compile:
        levers.compile_before_prepare(model, accelerator, run.compile_mode, run.compile_regional)
    prepared_model, prepared_optimizer = accelerator.prepare(model, optimizer)
    if run is not None and run.compile:
        levers.compile_after_prepare(
            prepared_model, accelerator, run.compile_mode, run.compile_regional
        )
    if accelerator.distributed_type == DistributedType.FSDP:
        # Accelerate has repointed the optimizer to the DTensor shards; FSDP2's policy casts.
        if hasattr(optimizer, "bind_layout"):
            bind_fsdp(optimizer, prepared_model)
        return prepared_model, prepared_optimizer, nullcontext()
    if not deepspeed:
        return prepared_model, prepared_optimizer, nullcontext()
    check_engine_plan(prepared_model, accelerator, plan)
    if hasattr(optimizer, "bind_layout"):
        bind_zero(prepared_model)
    try:
        check_deepspeed_skips_nonfinite(prepared_model)
    except ValueError as error:
        raise ConfigError("deepspeed", str(error)) from None
    return prepared_model, prepared_optimizer, deepspeed_autocast(prepared_model)


class StepAccumulation:
    """One optimizer step's accumulation context for the task (:class:`tvlars_scale.tasks.Accumulation`)."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        precision: AbstractContextManager,
        attempt: int,
        plan: BatchPlan,
    ):
        self.accelerator, self.model, self.precision = accelerator, model, precision
        self.attempt = attempt  # for fault_injection's NaN hook
        self.loss_weight = plan.loss_weight
        self.num_micro_batches = 0

    @contextmanager
    def micro_batch(self):
        self.num_micro_batches += 1
        with self.accelerator.accumulate(self.model), self.precision:
            yield

    def backward(self, loss: Tensor) -> None:
        self.accelerator.backward(fault_injection.nan_if_requested(loss, self.attempt))
