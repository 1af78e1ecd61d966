"""Rank-sharded micro batches, resumable to the exact micro batch: the index logic and in memory."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from tvlars_scale.batching import split_evenly
from tvlars_scale.data.policies import SampleAugment

# F.cross_entropy's default ignore_index: the padding samples of an evaluation pass (drop_last=False)
# then drop out of the loss by themselves, and accuracy masks them with `labels != PAD_LABEL`.
PAD_LABEL = -100


class EpochShards:
    """Which samples each rank takes in each micro batch of each epoch, and where an epoch stands.

    Every epoch draws ONE permutation of the dataset (seeded by ``seed + epoch``, the same on every
    rank). Training (``drop_last=True``) cuts it into optimizer steps of ``global_batch_size``
    samples, each step into ``grad_accum_steps`` rounds and each round over the ranks, as
    :class:`~tvlars_scale.batching.BatchPlan` splits it (sizes differing by at most one sample;
    all ``micro_batch_size`` when ``global = micro x accumulation x world``, the default): rank
    ``r`` takes the ``r``-th slice of each round. So the samples of one optimizer step are the same
    window of the permutation whatever the split into micro batch, accumulation and world size:
    (micro 16 x 2 ranks), (micro 32 x 1 rank) and (11 + 11 + 10 over 3 ranks) see the same
    samples in the same steps, every one of them once.

    ``drop_last=True`` drops the tail that does not fill a whole optimizer step, so every rank has
    the same number of micro batches and no step mixes two epochs. Evaluation cuts the permutation
    into *global micro batches* of ``micro_batch_size * world_size`` samples.
    ``drop_last=False`` (evaluation) pads the last global micro batch with wrapped-around samples
    labelled :data:`PAD_LABEL`, so every rank still has equal, full micro batches.

    Position in the epoch is counted in micro batches handed out, so a checkpoint taken after
    training on a batch resumes with the next one. Subclasses say what a sample index yields:
    :class:`MicroBatchLoader` (tensors in memory) and
    :class:`~tvlars_scale.data.stream_loader.StreamingLoader` (files decoded in worker processes).
    """

    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        grad_accum_steps: int = 1,
        global_batch_size: int | None = None,
    ) -> None:
        if micro_batch_size < 1 or grad_accum_steps < 1 or world_size < 1:
            raise ValueError(
                "micro_batch_size, grad_accum_steps and world_size must be >= 1, got "
                f"{micro_batch_size}, {grad_accum_steps}, {world_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self._num_samples = num_samples
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.grad_accum_steps = grad_accum_steps
        full = micro_batch_size * world_size * grad_accum_steps
        self.global_batch_size = global_batch_size or full
        # The plan's arithmetic (batching.plan_batches): the largest micro batch holds them all.
        if not full - micro_batch_size * world_size < self.global_batch_size <= full:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} does not fill {grad_accum_steps} "
                f"rounds of at most {micro_batch_size} micro x {world_size} ranks"
            )
        if drop_last and len(self) == 0:
            raise ValueError(
                f"{num_samples} samples do not fill one optimizer step of "
                f"{self.global_batch_size} ({micro_batch_size} micro x {grad_accum_steps} "
                f"accumulation x {world_size} ranks)"
            )
        self.epoch = 0
        self.position = 0  # micro batches of this epoch already handed out (equal on every rank)

    @property
    def num_samples(self) -> int:
        return self._num_samples

    @property
    def global_micro_batch_size(self) -> int:
        return self.micro_batch_size * self.world_size

    def __len__(self) -> int:
        """Micro batches per epoch on each rank (the whole epoch, not what is left of it)."""
        if self.drop_last:
            return (self.num_samples // self.global_batch_size) * self.grad_accum_steps
        return math.ceil(self.num_samples / self.global_micro_batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a new epoch starts at its first micro batch.

        Setting the epoch the loader is already in keeps the position, so the usual
        ``for epoch in range(start, n): loader.set_epoch(epoch)`` resumes mid-epoch after
        :meth:`load_state_dict`.
        """
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def start_at(self, position: int) -> None:
        """Skip the first ``position`` micro batches of the current epoch."""
        if not 0 <= position <= len(self):
            raise ValueError(
                f"position {position} is outside the epoch's {len(self)} micro batches"
            )
        self.position = position

    def state_dict(self) -> dict[str, int | bool]:
        """Where the loader is, and what the position is relative to (equal on every rank)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "global_batch_size": self.global_batch_size,
            "grad_accum_steps": self.grad_accum_steps,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        """Resume where ``state`` was taken, also under another (micro batch, world size) split.

        The permutation depends only on (seed, epoch, dataset size, shuffle), so a position is
        converted through samples consumed; it must fall on an optimizer step boundary (a global
        micro batch boundary for evaluation).
        """
        for key in ("num_samples", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state has {key}={state[key]} but this loader has {getattr(self, key)}"
                )
        consumed = _consumed_samples(state)
        unit = self.global_batch_size if self.drop_last else self.global_micro_batch_size
        if consumed % unit:
            what = "optimizer steps" if self.drop_last else "global micro batches"
            raise ValueError(
                f"{consumed} consumed samples are not a whole number of {what} of {unit}"
            )
        self.epoch = state["epoch"]
        per_unit = self.grad_accum_steps if self.drop_last else 1
        self.start_at(consumed // unit * per_unit)

    def _permutation(self) -> torch.Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(self.num_samples, generator=generator)
        return torch.arange(self.num_samples)

    def epoch_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation: this epoch's sample indices and padding mask, both shaped
        ``[len(self), world, micro]``."""
        order = self._permutation()
        total = len(self) * self.global_micro_batch_size
        # drop_last: total <= num_samples, the tail is dropped. Otherwise: wrap around to pad
        # (repeat, since a tiny evaluation set may be shorter than the padding).
        order = order.repeat(math.ceil(total / self.num_samples))[:total]
        is_padding = torch.arange(total) >= self.num_samples
        shape = (len(self), self.world_size, self.micro_batch_size)
        return order.view(shape), is_padding.view(shape)

    def rank_order(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """This rank's sample indices and padding mask of the epoch, flat, and the bounds of its
        micro batches in them: micro batch ``k`` is ``[bounds[k], bounds[k + 1])``."""
        if not self.drop_last:
            order, is_padding = self.epoch_order()
            bounds = list(range(0, (len(self) + 1) * self.micro_batch_size, self.micro_batch_size))
            return order[:, self.rank].reshape(-1), is_padding[:, self.rank].reshape(-1), bounds
        # Where this rank's micro batches lie in a step's window of the permutation.
        starts, sizes, round_start = [], [], 0
        for round_size in split_evenly(self.global_batch_size, self.grad_accum_steps):
            shares = split_evenly(round_size, self.world_size)
            starts.append(round_start + sum(shares[: self.rank]))
            sizes.append(shares[self.rank])
            round_start += round_size
        num_steps = len(self) // self.grad_accum_steps
        step_starts = torch.arange(num_steps) * self.global_batch_size
        order = self._permutation()
        mine = torch.cat(
            [
                order[(step_starts + start).view(-1, 1) + torch.arange(size)]
                for start, size in zip(starts, sizes, strict=True)
            ],
            dim=1,
        ).view(-1)
        bounds = [0]
        for _ in range(num_steps):
            for size in sizes:
                bounds.append(bounds[-1] + size)
        return mine, torch.zeros(len(mine), dtype=torch.bool), bounds


class MicroBatchLoader(EpochShards):
    """Iterate ``(images, labels)`` micro batches of this rank's share of one epoch, in memory.

    The sharding, padding and resume rules are :class:`EpochShards`'. The images may live on any
    device (put a small dataset on the GPU once to skip copies); the batches come out on that
    device. ``sample_augment`` (``data.augment``) transforms each sample as the batch is gathered,
    seeded by (seed, epoch, sample index).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        grad_accum_steps: int = 1,
        global_batch_size: int | None = None,
        sample_augment: SampleAugment | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if images.device != labels.device:
            raise ValueError(f"images on {images.device} but labels on {labels.device}")
        self.images, self.labels = images, labels
        self.sample_augment = sample_augment
        super().__init__(
            len(labels),
            micro_batch_size,
            rank,
            world_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            grad_accum_steps=grad_accum_steps,
            global_batch_size=global_batch_size,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, padding, bounds = self.rank_order()
        mine, mine_padding = order.to(self.images.device), padding.to(self.images.device)
        while self.position < len(self):
            batch = slice(bounds[self.position], bounds[self.position + 1])
            # Counted before the yield: the caller holds the batch, so it is consumed.
            self.position += 1
            labels = self.labels[mine[batch]]
            if not self.drop_last:
                labels = labels.masked_fill(mine_padding[batch], PAD_LABEL)
            images = self.images[mine[batch]]
            if self.sample_augment is not None:
                images = self.sample_augment.batch(images, self.seed, self.epoch, mine[batch])
            yield images, labels


def _consumed_samples(state: dict) -> int:
    """Samples of the epoch a saved loader had handed out (its position is counted in its own
    micro batches, at a step boundary when training)."""
    if "global_batch_size" not in state:  # saved before uneven plans: equal global micro batches
        return state["position"] * state["global_micro_batch_size"]
    steps, rest = divmod(state["position"], state["grad_accum_steps"])
    if rest:
        raise ValueError(
            f"loader state at micro batch {state['position']}, inside an optimizer step of "
            f"{state['grad_accum_steps']}"
        )
    return steps * state["global_batch_size"]
