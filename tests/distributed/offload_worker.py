"""What each rank runs for test_zero_offload.py: ZeRO-2 and ZeRO-3 with the optimizer offloaded to
host memory (the shipped ``launch/deepspeed_zero{2,3}_offload.json``), every optimizer, one launch."""

from __future__ import annotations

import json

import tiny_training
from zero_worker import count_collectives

from tvlars_scale.optim.zero_layout import bind_zero

STAGES = (2, 3)


def offload_config(stage: int) -> dict:
    """The shipped offload JSON with its ``"auto"`` fields filled as Accelerate would, in fp32."""
    path = tiny_training.LAUNCH_DIR / f"deepspeed_zero{stage}_offload.json"
    config = json.loads(path.read_text())
    filled = tiny_training.deepspeed_config(stage)  # the same batch fields and precision
    for key, value in config.items():
        if value == "auto":
            config[key] = filled[key]
    for precision in ("fp16", "bf16"):
        config[precision] = {"enabled": False}
    return config


def offloaded(zero_optimizer) -> bool:
    """Whether DeepSpeed really keeps the optimizer partitions in host memory (its own flags)."""
    return bool(
        getattr(zero_optimizer, "cpu_offload", False)  # ZeRO-1/2
        or getattr(zero_optimizer, "offload_optimizer", False)  # ZeRO-3
    )


def run_offload(optimizer_name: str, stage: int) -> dict:
    import deepspeed

    model, optimizer = tiny_training.make_model_and_optimizer(optimizer_name)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=offload_config(stage)
    )
    bind_zero(engine)
    with count_collectives(optimizer) as counts:
        params = tiny_training.train_deepspeed(engine)
    return {
        "params": params,
        "collectives": dict(counts),
        "zero_optimizer": type(engine.optimizer).__name__,
        "client": type(engine.optimizer.optimizer).__name__,
        "offloaded": offloaded(engine.optimizer),
    }


def all_settings() -> dict:
    return {
        (stage, name): run_offload(name, stage)
        for stage in STAGES
        for name in tiny_training.OPTIMIZER_SETTINGS
    }
