"""Batch arithmetic: global batch -> micro x accumulation x ranks; LR scaling; epochs -> steps.

The user sets ``global_batch_size`` and ``micro_batch_size``; ``grad_accum_steps`` is derived from
the world size, never set by hand, so the effective batch (and with it the meaning of the learning
rate and of every step-valued schedule) does not change when the same config runs on 1 or 128 ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tvlars_scale.config import ConfigError

__all__ = ["BatchPlan", "epochs_to_steps", "plan_batches", "scale_lr"]


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's ``global_batch_size`` samples are split over ranks and time."""

    global_batch_size: int
    micro_batch_size: int
    world_size: int
    grad_accum_steps: int

    def describe(self) -> str:
        """``effective batch 16384 = 64 micro x 128 accumulation x 2 ranks``."""
        ranks = "rank" if self.world_size == 1 else "ranks"
        return (
            f"effective batch {self.global_batch_size} = {self.micro_batch_size} micro x "
            f"{self.grad_accum_steps} accumulation x {self.world_size} {ranks}"
        )


def plan_batches(global_batch_size: int, micro_batch_size: int, world_size: int) -> BatchPlan:
    """Derive ``grad_accum_steps = global / (micro x world)``; refuse a split that leaves a rest."""
    samples_per_round = micro_batch_size * world_size
    if global_batch_size % samples_per_round:
        raise ConfigError(
            "batch.global_batch_size",
            f"{global_batch_size} is not divisible by micro_batch_size x world size = "
            f"{micro_batch_size} x {world_size} = {samples_per_round}",
        )
    return BatchPlan(
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        world_size=world_size,
        grad_accum_steps=global_batch_size // samples_per_round,
    )


def scale_lr(lr: float, rule: str, global_batch_size: int, base_batch_size: int) -> float:
    """The learning rate for ``global_batch_size`` given ``lr`` at ``base_batch_size``.

    ``linear`` (Goyal et al.): ``lr * global / base``; ``sqrt`` (Krizhevsky; the TVLARS paper):
    ``lr * sqrt(global / base)``; ``none``: ``lr`` unchanged.
    """
    ratio = global_batch_size / base_batch_size
    if rule == "none":
        return lr
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    raise ValueError(f"unknown lr scaling rule {rule!r}")


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """An epoch-valued setting (TVLARS delay, warm-up) in optimizer steps, rounded to nearest."""
    return round(epochs * steps_per_epoch)
