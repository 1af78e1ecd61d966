"""Rank-sharded micro batches, resumable to the exact micro batch: the index logic and in memory."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

# F.cross_entropy's default ignore_index: the padding samples of an evaluation pass (drop_last=False)
# then drop out of the loss by themselves, and accuracy masks them with `labels != PAD_LABEL`.
PAD_LABEL = -100


class EpochShards:
    """Which samples each rank takes in each micro batch of each epoch, and where an epoch stands.

    Every epoch draws ONE permutation of the dataset (seeded by ``seed + epoch``, the same on every
    rank) and cuts it into *global micro batches* of ``micro_batch_size * world_size`` samples;
    rank ``r`` takes the ``r``-th slice of each. So the samples of one optimizer step (a window of
    ``grad_accum_steps`` global micro batches) are the same set of positions of the permutation
    whatever the split into micro batch, accumulation and world size: (micro 16 x 2 ranks) and
    (micro 32 x 1 rank) see the same samples in the same steps.

    ``drop_last=True`` (training) drops the tail that does not fill a whole optimizer step, so
    every rank has the same number of micro batches and no step mixes two epochs.
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
        if drop_last and len(self) == 0:
            raise ValueError(
                f"{num_samples} samples do not fill one optimizer step of "
                f"{self.global_micro_batch_size * grad_accum_steps} "
                f"({micro_batch_size} micro x {grad_accum_steps} accumulation x {world_size} ranks)"
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
            window = self.global_micro_batch_size * self.grad_accum_steps
            return (self.num_samples // window) * self.grad_accum_steps
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
            "global_micro_batch_size": self.global_micro_batch_size,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        """Resume where ``state`` was taken, also under another (micro batch, world size) split.

        The permutation depends only on (seed, epoch, dataset size, shuffle), so a position is
        converted through samples consumed; it must fall on a global micro batch boundary.
        """
        for key in ("num_samples", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state has {key}={state[key]} but this loader has {getattr(self, key)}"
                )
        consumed = state["position"] * state["global_micro_batch_size"]
        if consumed % self.global_micro_batch_size:
            raise ValueError(
                f"{consumed} consumed samples are not a whole number of global micro batches "
                f"of {self.global_micro_batch_size}"
            )
        self.epoch = state["epoch"]
        self.start_at(consumed // self.global_micro_batch_size)

    def epoch_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's sample indices and padding mask, both shaped ``[len(self), world, micro]``."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        total = len(self) * self.global_micro_batch_size
        # drop_last: total <= num_samples, the tail is dropped. Otherwise: wrap around to pad
        # (repeat, since a tiny evaluation set may be shorter than the padding).
        order = order.repeat(math.ceil(total / self.num_samples))[:total]
        is_padding = torch.arange(total) >= self.num_samples
        shape = (len(self), self.world_size, self.micro_batch_size)
        return order.view(shape), is_padding.view(shape)

    def rank_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's sample indices and padding mask of the epoch, ``[len(self), micro]``."""
        order, is_padding = self.epoch_order()
        return order[:, self.rank], is_padding[:, self.rank]


class MicroBatchLoader(EpochShards):
    """Iterate ``(images, labels)`` micro batches of this rank's share of one epoch, in memory.

    The sharding, padding and resume rules are :class:`EpochShards`'. The images may live on any
    device (put a small dataset on the GPU once to skip copies); the batches come out on that
    device.
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
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if images.device != labels.device:
            raise ValueError(f"images on {images.device} but labels on {labels.device}")
        self.images, self.labels = images, labels
        super().__init__(
            len(labels),
            micro_batch_size,
            rank,
            world_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            grad_accum_steps=grad_accum_steps,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        mine, mine_padding = (t.to(self.images.device) for t in self.rank_order())
        while self.position < len(self):
            index = self.position
            # Counted before the yield: the caller holds the batch, so it is consumed.
            self.position += 1
            labels = self.labels[mine[index]]
            if not self.drop_last:
                labels = labels.masked_fill(mine_padding[index], PAD_LABEL)
            yield self.images[mine[index]], labels
