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

The worker processes are forked at the first pass and kept (``persistent_workers``): the epoch
and the sample indices travel with each item, so nothing in a worker belongs to an epoch.

Unreadable images (truncated, corrupt): ``bad_images="error"`` (default) raises an
:class:`UnreadableImageError` naming the file, in the training process and in one line (a worker
returns it as a value; ``tvlars-train`` exits 4); ``"skip"`` replaces the sample by the
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
    Box,
    center_crop_box,
    decode_crop,
    image_size,
    random_resized_crop,
)
from tvlars_scale.data.loader import PAD_LABEL, EpochShards
from tvlars_scale.data.policies import SampleAugment
from tvlars_scale.data.ssl_decode import TwoViewTransform
from tvlars_scale.data.types import DataError

__all__ = ["BAD_IMAGE_POLICIES", "StreamingLoader", "Transform", "UnreadableImageError"]

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
        augment: SampleAugment | None = None,
    ) -> None:
        self.size, self.train, self.seed = size, train, seed
        self.augment = augment  # data.augment, after the crop and flip (training)
        self.crop_scale, self.flip = tuple(crop_scale), flip
        # 224 -> 256, the usual ImageNet evaluation ratio of 0.875.
        self.eval_resize = eval_resize or round(size / 0.875)

    def empty_batch(self, size: int) -> torch.Tensor:
        """A micro batch of ``size`` samples to decode into."""
        return torch.empty((size, 3, self.size, self.size), dtype=torch.uint8)

    def __call__(self, data: bytes, epoch: int, index: int) -> torch.Tensor:
        box, flip, rng = self._draw(data, epoch, index)
        crop = decode_crop(data, box, self.size, flip=flip)
        # data.augment continues the sample's generator after the crop and flip (training only).
        return crop if self.augment is None or rng is None else self.augment(crop, rng)

    def params(self, data: bytes, epoch: int, index: int) -> tuple[Box, bool]:
        """The sample's crop box (full-size pixels) and flip, from its header and (seed, epoch,
        index) alone: what any decoder (this one, data.decoder=dali) crops and mirrors."""
        box, flip, _ = self._draw(data, epoch, index)
        return box, flip

    def _draw(
        self, data: bytes, epoch: int, index: int
    ) -> tuple[Box, bool, np.random.Generator | None]:
        width, height = image_size(data)
        if not self.train:
            return center_crop_box(width, height, self.size, self.eval_resize), False, None
        # One generator per (seed, epoch, sample): no state shared between samples or workers.
        rng = np.random.default_rng([self.seed, epoch, int(index)])
        box = random_resized_crop(width, height, rng, self.crop_scale)
        return box, bool(self.flip and rng.random() < 0.5), rng


class UnreadableImageError(DataError):
    """An image could not be read under ``bad_images="error"``: the run stops (exit 4)."""


Sample = torch.Tensor | tuple[torch.Tensor, ...]
"""What a transform makes of one sample: a ``uint8`` image, or a named tuple of tensors (the two
views of Barlow Twins, :class:`~tvlars_scale.data.ssl_views.DecodedViews`); a micro batch is the
same with a first dimension."""


def _put(batch: Sample | list, slot: int, sample: Sample) -> None:
    if isinstance(batch, torch.Tensor | list):  # a list: data.decoder=dali's planned samples
        batch[slot] = sample
        return
    for part, value in zip(batch, sample, strict=True):
        _put(part, slot, value)


def _to(batch: Sample, device: torch.device, non_blocking: bool = False) -> Sample:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    return type(batch)(*(_to(part, device, non_blocking) for part in batch))


def _tensors(batch: Sample) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    return [tensor for part in batch for tensor in _tensors(part)]


class _MicroBatches(Dataset):
    """Item ``(epoch, row, padding)``: one micro batch of this rank, decoded (runs in a worker).

    The epoch travels with the item, not in the dataset: the workers are forked once and keep
    this object across epochs (persistent workers).
    """

    def __init__(self, source, transform, bad_images) -> None:
        self.source, self.transform, self.bad_images = source, transform, bad_images

    def __getitem__(
        self, item: tuple[int, np.ndarray, np.ndarray | None]
    ) -> tuple[Sample | None, torch.Tensor | None, list[str], str | None]:
        """``(images, labels, skipped, None)``, or ``(None, None, skipped, error)`` when an image
        is unreadable under ``bad_images="error"``: the error crosses the process boundary as a
        value, so the training process raises it as one line (the DataLoader would re-raise a
        worker's exception with both tracebacks in its message)."""
        epoch, row, padding = item
        images = self.transform.empty_batch(len(row))
        labels = torch.empty(len(row), dtype=torch.int64)
        skipped: list[str] = []
        try:
            for slot, index in enumerate(row):
                used, sample = self._sample(epoch, int(index), skipped)
                _put(images, slot, sample)
                labels[slot] = int(self.source.labels[used])
        except UnreadableImageError as error:
            return None, None, skipped, str(error)
        if padding is not None:
            labels.masked_fill_(torch.from_numpy(padding), PAD_LABEL)
        return images, labels, skipped, None

    def _sample(self, epoch: int, index: int, skipped: list[str]) -> tuple[int, Sample]:
        """Decode ``index``, or its replacement; returns the index used and its sample."""
        for attempt in range(MAX_REPLACEMENT_TRIES):
            candidate = (index + attempt) % len(self.source)
            try:
                return candidate, self.transform(self.source.read(candidate), epoch, candidate)
            except (BadImageError, OSError) as error:
                where = self.source.describe(candidate)
                if self.bad_images == "error":
                    raise UnreadableImageError(
                        f"unreadable image {where}: {error} (data.bad_images=skip replaces "
                        "such images by the next readable one and counts them)"
                    ) from None
                skipped.append(f"{where} ({error})")
        raise UnreadableImageError(
            f"{MAX_REPLACEMENT_TRIES} unreadable images in a row from "
            f"{self.source.describe(index)}: is the dataset intact?"
        )


class _RemainingMicroBatches:
    """The DataLoader's sampler: the items of the micro batches left in the epoch, as of the last
    :meth:`start` (the loader calls it before each pass)."""

    def __init__(self) -> None:
        self.epoch, self.start_at = 0, 0
        self.order, self.padding, self.bounds = np.empty(0, np.int64), None, [0]

    def start(
        self,
        epoch: int,
        start_at: int,
        order: np.ndarray,
        padding: np.ndarray | None,
        bounds: list[int],
    ) -> None:
        """``order`` / ``padding``: the rank's samples of the epoch, flat; micro batch ``k`` is
        ``[bounds[k], bounds[k + 1])`` (:meth:`EpochShards.rank_order`)."""
        self.epoch, self.start_at, self.order, self.padding = epoch, start_at, order, padding
        self.bounds = bounds

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        epoch, order, padding, bounds = self.epoch, self.order, self.padding, self.bounds
        for k in range(self.start_at, len(bounds) - 1):
            batch = slice(bounds[k], bounds[k + 1])
            yield epoch, order[batch], None if padding is None else padding[batch]


class StreamingLoader(EpochShards):
    """This rank's micro batches of ``source``, decoded by ``num_workers`` worker processes.

    Yields ``(uint8 [micro, 3, S, S], int64 [micro])`` on ``device`` (with a
    :class:`~tvlars_scale.data.ssl_decode.TwoViewTransform`: ``DecodedViews`` of ``micro`` samples
    in place of the images); on CUDA the batches are pinned and copied on a side stream one batch
    ahead, so the copy overlaps the step.
    """

    def __init__(
        self,
        source,
        transform: Transform | TwoViewTransform,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        grad_accum_steps: int = 1,
        global_batch_size: int | None = None,
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
        self._remaining = _RemainingMicroBatches()
        self._loader: DataLoader | None = None  # built at the first pass, kept (its workers too)
        super().__init__(
            len(source),
            micro_batch_size,
            rank,
            world_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            grad_accum_steps=grad_accum_steps,
            global_batch_size=global_batch_size,
        )

    def state_dict(self) -> dict:
        return {**super().state_dict(), "skipped_images": self.skipped_images}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.skipped_images = state.get("skipped_images", 0)

    def close(self) -> None:
        """Stop the decode workers now (a later pass forks new ones). They ignore SIGTERM
        (:func:`_fixed_mmap_threshold`), so workers alive when the process exits hang it in
        multiprocessing's join; dropping the DataLoader shuts them down through their queues."""
        self._loader = None

    def _host_batches(
        self,
    ) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, list[str], str | None]]:
        order, is_padding, bounds = self.rank_order()
        padding = None if self.drop_last else is_padding.numpy()
        # resume: start at the next micro batch
        self._remaining.start(self.epoch, self.position, order.numpy(), padding, bounds)
        if self._loader is None:
            workers = self.num_workers
            self._loader = DataLoader(
                _MicroBatches(self.source, self.transform, self.bad_images),
                batch_size=None,  # an item is a whole micro batch
                sampler=self._remaining,
                num_workers=workers,
                prefetch_factor=self.prefetch_factor if workers else None,
                # Forked once, kept across epochs (and evaluations): an epoch at a 32K batch is
                # 39 steps, so re-forking every epoch was a visible share of it. Nothing of an
                # epoch lives in the workers: every item carries its epoch and sample indices.
                persistent_workers=workers > 0,
                pin_memory=self.device.type == "cuda",
                # Its own generator: a DataLoader iterator otherwise draws its workers' base seed
                # from the global torch RNG, and a resumed run (one more iterator) would drift from
                # the uninterrupted one. The seed is unused: augmentation is seeded per sample.
                generator=torch.Generator().manual_seed(self.seed),
                worker_init_fn=_fixed_mmap_threshold,
            )
        return iter(self._loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, skipped in self._on_device(_raise_unreadable(self._host_batches())):
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
                yield _to(images, self.device), labels.to(self.device), skipped
            return
        copy_stream = torch.cuda.Stream(self.device)
        pending = None
        for images, labels, skipped in batches:
            with torch.cuda.stream(copy_stream):
                ready = (
                    _to(images, self.device, non_blocking=True),
                    labels.to(self.device, non_blocking=True),
                    skipped,
                )
            if pending is not None:
                yield pending  # the step on `pending` is queued while `ready` copies
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(copy_stream)
            for tensor in _tensors(ready[:2]):
                tensor.record_stream(current)  # freed only after the step that reads it
            pending = ready
        if pending is not None:
            yield pending


def _raise_unreadable(batches: Iterator) -> Iterator:
    """``(images, labels, skipped)``; a worker's unreadable-image error raised here, in one line."""
    for images, labels, skipped, error in batches:
        if error is not None:
            # The decode workers ignore SIGTERM (pre-emption); at exit multiprocessing would
            # terminate and then join them forever. Stop them through their queues first.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            raise UnreadableImageError(error)
        yield images, labels, skipped
