"""Batch arithmetic: global batch -> micro x accumulation x ranks; LR scaling; epochs -> steps.

The user sets ``global_batch_size`` and ``micro_batch_size``; ``grad_accum_steps`` is derived from
the world size, never set by hand, so the effective batch (and with it the meaning of the learning
rate and of every step-valued schedule) does not change when the same config runs on 1 or 4,096
ranks.

Any world size runs any global batch: ``grad_accum_steps = ceil(global / (micro x world))``, each
optimizer step's ``global_batch_size`` samples are cut into ``grad_accum_steps`` rounds whose sizes
differ by at most one, and each round over the ranks the same way, so micro batches differ by at
most one sample (32,768 over 1,000 ranks: 768 ranks take 33, 232 take 32). A micro batch's mean loss
is then weighted by its share (:meth:`BatchPlan.loss_weight`: each rank's summed loss scaled by
``world x accumulation / global``), which makes the data-parallel mean of the ranks' gradients the
gradient of the mean over the global batch, exactly. When ``global = micro x accumulation x world``
every weight is 1 and nothing is scaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tvlars_scale.config import ConfigError

__all__ = ["BatchPlan", "epochs_to_steps", "plan_batches", "scale_lr", "split_evenly"]


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` cut into ``parts`` sizes that differ by at most one, the larger ones first."""
    size, larger = divmod(total, parts)
    return [size + 1] * larger + [size] * (parts - larger)


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's ``global_batch_size`` samples are split over ranks and time.

    ``micro_batch_size`` is the largest micro batch a rank takes; when the split is uneven some
    take one sample less (:meth:`rank_micro_batch_sizes`).
    """

    global_batch_size: int
    micro_batch_size: int
    world_size: int
    grad_accum_steps: int

    @property
    def even(self) -> bool:
        """Every micro batch of every rank holds ``micro_batch_size`` samples."""
        return (
            self.micro_batch_size * self.grad_accum_steps * self.world_size
            == self.global_batch_size
        )

    def round_sizes(self) -> list[int]:
        """Samples of each accumulation round (one micro batch per rank) of a step."""
        return split_evenly(self.global_batch_size, self.grad_accum_steps)

    def rank_micro_batch_sizes(self, rank: int) -> list[int]:
        """The sizes of ``rank``'s micro batches in each step, in order."""
        return [split_evenly(size, self.world_size)[rank] for size in self.round_sizes()]

    def loss_weight(self, num_samples: int) -> float:
        """Factor of a micro batch's MEAN loss over ``num_samples`` samples that makes the step's
        gradient (accumulation divides by ``grad_accum_steps``, data parallelism averages over
        ranks) the gradient of the mean over the global batch; 1 for a full micro batch of an even
        plan."""
        share = num_samples * self.grad_accum_steps * self.world_size
        return 1.0 if share == self.global_batch_size else share / self.global_batch_size

    def describe(self) -> str:
        """``effective batch 16384 = 64 micro x 128 accumulation x 2 ranks``; uneven:
        ``effective batch 32768 = 1000 ranks x 1 accumulation x 32-33 micro (768 of the 1000 micro
        batches take 33)``."""
        ranks = "rank" if self.world_size == 1 else "ranks"
        if self.even:
            return (
                f"effective batch {self.global_batch_size} = {self.micro_batch_size} micro x "
                f"{self.grad_accum_steps} accumulation x {self.world_size} {ranks}"
            )
        sizes = [
            size
            for round_size in self.round_sizes()
            for size in split_evenly(round_size, self.world_size)
        ]
        smallest, largest, num_largest = min(sizes), max(sizes), sizes.count(max(sizes))
        take = "takes" if num_largest == 1 else "take"
        return (
            f"effective batch {self.global_batch_size} = {self.world_size} {ranks} x "
            f"{self.grad_accum_steps} accumulation x {smallest}-{largest} micro "
            f"({num_largest} of the {len(sizes)} micro batches {take} {largest})"
        )


def plan_batches(global_batch_size: int, micro_batch_size: int, world_size: int) -> BatchPlan:
    """Derive ``grad_accum_steps = ceil(global / (micro x world))`` and the largest micro batch a
    rank then takes (``micro_batch_size`` itself when the product divides the global batch)."""
    if global_batch_size < world_size:
        raise ConfigError(
            "batch.global_batch_size",
            f"{global_batch_size} is smaller than the world size {world_size}: some ranks would "
            "get no sample",
        )
    grad_accum_steps = math.ceil(global_batch_size / (micro_batch_size * world_size))
    largest_round = math.ceil(global_batch_size / grad_accum_steps)
    return BatchPlan(
        global_batch_size=global_batch_size,
        micro_batch_size=math.ceil(largest_round / world_size),
        world_size=world_size,
        grad_accum_steps=grad_accum_steps,
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
