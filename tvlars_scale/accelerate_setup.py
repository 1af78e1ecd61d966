"""Accelerate and DeepSpeed set up for a batch plan: the processes, the batch the engine runs, autocast.

Under DeepSpeed the trainer, not the JSON, decides the batch: :func:`put_plan_into_deepspeed` writes
the plan into the plugin's config before ``prepare`` (a JSON value that disagrees is refused), and
:func:`check_engine_plan` asks the engine afterwards what it really runs (Accelerate only warns).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from tvlars_scale.batching import BatchPlan
from tvlars_scale.config import Config, ConfigError

__all__ = ["check_engine_plan", "deepspeed_autocast", "make_accelerator", "put_plan_into_deepspeed"]


def make_accelerator(config: Config) -> Accelerator:
    precision = config.run.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("run.mixed_precision", "fp16 needs a GPU; use bf16 on the CPU")
    handlers, cpu = [], False
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Without the gloo handler Accelerate reports num_processes == 1 on every CPU rank
        # (DESIGN.md section 5); with it and a single process, Accelerate asks for a process group
        # that does not exist.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
        # Without cpu=True several CPU processes get DistributedType.NO: no DDP wrapper, so no
        # gradient all-reduce. DeepSpeed must not get it (Accelerate then skips its init).
        cpu = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        log_with="tensorboard" if config.run.tensorboard else None,
        project_dir=config.run.output_dir,
        kwargs_handlers=handlers,
    )
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        raise RuntimeError(
            f"{accelerator.num_processes} processes but Accelerate chose no distributed mode: "
            "gradients would not be synchronised"
        )
    return accelerator


def put_plan_into_deepspeed(accelerator: Accelerator, plan: BatchPlan) -> None:
    """Write the batch plan into the DeepSpeed config; refuse a config file that disagrees."""
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "train_batch_size": plan.global_batch_size,
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
    # Accelerate fills an "auto" gradient_clipping with 1.0; the one-process and DDP paths do not
    # clip, so neither does DeepSpeed unless its config sets a number.
    if ds_config.get("gradient_clipping", "auto") == "auto":
        ds_config["gradient_clipping"] = 0.0


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
        plan.global_batch_size,
        plan.grad_accum_steps,
    )
    if actual != expected:
        raise RuntimeError(
            f"DeepSpeed runs micro batch {actual[0]}, accumulation {actual[1]}, train batch "
            f"{actual[2]} (Accelerate accumulation {actual[3]}), not {plan.describe()}"
        )
