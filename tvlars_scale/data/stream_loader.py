"""Micro batches decoded from disk in ``DataLoader`` workers, resumable to the exact micro batch.

Which samples form a micro batch is :class:`~tvlars_scale.data.loader.EpochShards`' rule, the same
as in memory: ranks take disjoint slices of one permutation per epoch, and a step's samples do not
depend on the (micro batch, accumulation, world size) split. Each worker assembles WHOLE micro
batches (``batch_size=None``: one dataset item is one micro batch of this rank), so a batch crosses
the process boundary once, as ``uint8`` (a quarter of ``ToTensor``'s float32 bytes).

Augmentation randomness is a function of (seed, epoch, sample index) only: every sample seeds its
own numpy generator with that triple. So no worker RNG state needs saving, a resume mid-epoch with
any number of workers decodes exactly the batches the uninterrupted run would have, and another
world size sees the same crops and flips for the same samples.

Unreadable images (truncated, corrupt): ``bad_images="error"`` (default) raises a
:class:`~tvlars_scale.data.types.DataError` naming the file; ``"skip"`` replaces the sample by the
next index of the dataset that decodes (``index + 1``, ``+ 2``... modulo its size, so the choice is
deterministic and the batch keeps its shape), with that sample's own label and augmentation, and
counts it: every replacement is printed with the file's name, and :attr:`skipped_images` (saved in
the loader's state) counts them over the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tvlars_scale.data.decode import (
    BadImageError,
    center_crop_box,
    decode_crop,
    image_size,
    random_resized_crop,
)
from tvlars_scale.data.loader import PAD_LABEL, EpochShards
from tvlars_scale.data.types import DataError

__all__ = ["BAD_IMAGE_POLICIES", "StreamingLoader", "Transform"]

BAD_IMAGE_POLICIES = ("error", "skip")
MAX_REPLACEMENT_TRIES = 100  # a dataset with 100 unreadable files in a row is not worth training
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, kept fixed


def _fixed_mmap_threshold(worker_id: int) -> None:
    """Worker init: ignore the pre-emption signals; keep glibc's mmap threshold at 128 KiB.

    A time limit or ``scancel`` sends SIGTERM to every process of the job, these workers too: a
    worker that died of it would make its rank raise "DataLoader worker exited unexpectedly"
    instead of saving. The rank stops on the signal (tvlars_scale.preemption); its workers serve
    it until then, and exit with it.

    A worker allocates and frees a few hundred KiB per image (decoded pixels, crops) and a
    micro batch of MiBs; glibc's dynamic threshold then moves these to the heap, whose
    fragmentation grew each worker by ~2 MiB per micro batch here (700 MiB over one 3,000-image
    epoch, benchmarks/streaming_input.py). Fixed, large blocks are mmapped and returned on free:
    the workers' RSS stays flat, whatever the epoch's length.
    """
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


class Transform:
    """A sample's bytes -> ``uint8 [3, size, size]``: random-resized-crop + flip (training), or
    resize-then-centre-crop (evaluation). Picklable, so it travels to the workers."""

    def __init__(
        self,
        size: int,
        *,
        train: bool,
        seed: int = 0,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        flip: bool = True,
        eval_resize: int | None = None,
    ) -> None:
        self.size, self.train, self.seed = size, train, seed
        self.crop_scale, self.flip = tuple(crop_scale), flip
        # 224 -> 256, the usual ImageNet evaluation ratio of 0.875.
        self.eval_resize = eval_resize or round(size / 0.875)

    def __call__(self, data: bytes, epoch: int, index: int) -> torch.Tensor:
        width, height = image_size(data)
        if not self.train:
            return decode_crop(
                data, center_crop_box(width, height, self.size, self.eval_resize), self.size
            )
        # One generator per (seed, epoch, sample): no state shared between samples or workers.
        rng = np.random.default_rng([self.seed, epoch, int(index)])
        box = random_resized_crop(width, height, rng, self.crop_scale)
        flip = self.flip and rng.random() < 0.5
        return decode_crop(data, box, self.size, flip=flip)


class _MicroBatches(Dataset):
    """Item ``k``: this rank's ``k``-th micro batch of the epoch, decoded (runs in a worker)."""

    def __init__(self, source, rows, padding, transform, epoch, bad_images) -> None:
        self.source, self.rows, self.padding = source, rows, padding
        self.transform, self.epoch, self.bad_images = transform, epoch, bad_images

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        row = self.rows[k]
        size = self.transform.size
        images = torch.empty((len(row), 3, size, size), dtype=torch.uint8)
        labels = torch.empty(len(row), dtype=torch.int64)
        skipped: list[str] = []
        for slot, index in enumerate(row):
            used = self._sample(int(index), images, slot, skipped)
            labels[slot] = int(self.source.labels[used])
        if self.padding is not None:
            labels.masked_fill_(torch.from_numpy(self.padding[k]), PAD_LABEL)
        return images, labels, skipped

    def _sample(self, index: int, images: torch.Tensor, slot: int, skipped: list[str]) -> int:
        """Decode ``index`` into ``images[slot]``, or its replacement; returns the index used."""
        for attempt in range(MAX_REPLACEMENT_TRIES):
            candidate = (index + attempt) % len(self.source)
            try:
                images[slot] = self.transform(self.source.read(candidate), self.epoch, candidate)
                return candidate
            except (BadImageError, OSError) as error:
                where = self.source.describe(candidate)
                if self.bad_images == "error":
                    raise DataError(
                        f"unreadable image {where}: {error} (data.bad_images=skip replaces "
                        "such images by the next readable one and counts them)"
                    ) from None
                skipped.append(f"{where} ({error})")
        raise DataError(
            f"{MAX_REPLACEMENT_TRIES} unreadable images in a row from "
            f"{self.source.describe(index)}: is the dataset intact?"
        )


class StreamingLoader(EpochShards):
    """This rank's micro batches of ``source``, decoded by ``num_workers`` worker processes.

    Yields ``(uint8 [micro, 3, S, S], int64 [micro])`` on ``device``; on CUDA the batches are
    pinned and copied on a side stream one batch ahead, so the copy overlaps the step.
    """

    def __init__(
        self,
        source,
        transform: Transform,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        grad_accum_steps: int = 1,
        *,
        num_workers: int = 4,
        prefetch_factor: int = 2,
        bad_images: str = "error",
        device: torch.device | str = "cpu",
    ) -> None:
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
        self.source, self.transform = source, transform
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.bad_images, self.device = bad_images, torch.device(device)
        self.skipped_images = 0
        super().__init__(
            len(source),
            micro_batch_size,
            rank,
            world_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            grad_accum_steps=grad_accum_steps,
        )

    def state_dict(self) -> dict:
        return {**super().state_dict(), "skipped_images": self.skipped_images}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.skipped_images = state.get("skipped_images", 0)

    def _host_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        order, is_padding = self.rank_order()
        padding = None if self.drop_last else is_padding.numpy()
        dataset = _MicroBatches(
            self.source, order.numpy(), padding, self.transform, self.epoch, self.bad_images
        )
        workers = self.num_workers
        loader = DataLoader(
            dataset,
            batch_size=None,  # an item is a whole micro batch
            sampler=range(self.position, len(self)),  # resume: start at the next micro batch
            num_workers=workers,
            prefetch_factor=self.prefetch_factor if workers else None,
            pin_memory=self.device.type == "cuda",
            # Its own generator: a DataLoader iterator otherwise draws its workers' base seed from
            # the global torch RNG, and a resumed run (one more iterator) would drift from the
            # uninterrupted one. The seed is unused: augmentation is seeded per sample.
            generator=torch.Generator().manual_seed(self.seed + self.epoch),
            worker_init_fn=_fixed_mmap_threshold,
        )
        return iter(loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, skipped in self._on_device(self._host_batches()):
            if skipped:
                self.skipped_images += len(skipped)
                for what in skipped:
                    print(
                        f"warning: skipped unreadable image {what}; "
                        f"{self.skipped_images} skipped so far",
                        file=sys.stderr,
                    )
            # Counted before the yield: the caller holds the batch, so it is consumed.
            self.position += 1
            yield images, labels

    def _on_device(self, batches: Iterator) -> Iterator:
        if self.device.type != "cuda":
            for images, labels, skipped in batches:
                yield images.to(self.device), labels.to(self.device), skipped
            return
        copy_stream = torch.cuda.Stream(self.device)
        pending = None
        for images, labels, skipped in batches:
            with torch.cuda.stream(copy_stream):
                ready = (
                    images.to(self.device, non_blocking=True),
                    labels.to(self.device, non_blocking=True),
                    skipped,
                )
            if pending is not None:
                yield pending  # the step on `pending` is queued while `ready` copies
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(copy_stream)
            for tensor in ready[:2]:
                tensor.record_stream(current)  # freed only after the step that reads it
            pending = ready
        if pending is not None:
            yield pending
