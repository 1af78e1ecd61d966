"""``data.decoder: dali``: the streaming loader's JPEG decode, crop, resize and flip run in NVIDIA DALI
(nvJPEG on the GPU: the ``mixed`` decoder; DALI's CPU decoder where there is no GPU).

Everything but the pixels stays :class:`~tvlars_scale.data.stream_loader.StreamingLoader`'s: the
DataLoader workers read each micro batch's encoded bytes (in the same order, with the same
bad-image policy) and draw each sample's crop box and flip from (seed, epoch, index)
(:meth:`Transform.params`); DALI gets them through ``external_source`` and only decodes
(``decoders.image_slice``: the box alone, where the decoder can), resizes (antialiased bilinear) and
mirrors. So the crops, flips, order and exact mid-epoch resume are those of ``data.decoder: cpu``;
the pixels differ by the decoders' arithmetic (the CPU path decodes at a reduced DCT scale and
resizes from there, DALI decodes the box at full size): a few grey levels on average, measured in
tests/unit/test_dali_decode.py.

A file whose header reads but whose body DALI cannot decode stops the run (exit 4) with DALI's
message; ``data.decoder: cpu`` names the file (and ``data.bad_images: skip`` replaces it).

DALI is an optional extra (``pip install 'tvlars_scale[dali]'``); nothing here imports it unless
the decoder is built.
"""

from __future__ import annotations

import atexit
import re
from collections.abc import Iterator

import numpy as np
import torch

from tvlars_scale.data.decode import Box
from tvlars_scale.data.stream_loader import StreamingLoader, Transform

__all__ = ["DaliDecoder", "DaliStreamingLoader"]

Planned = tuple[bytes, Box, bool, int]
"""One sample as the workers hand it over: its encoded bytes, crop box, flip and dataset index."""


class _Plans:
    """A :class:`Transform` whose workers read and plan but do not decode: a sample becomes
    ``(bytes, box, flip, index)``, a micro batch a list of them. Picklable (it travels to the workers)."""

    def __init__(self, transform: Transform) -> None:
        self.transform, self.size = transform, transform.size

    def __call__(self, data: bytes, epoch: int, index: int) -> Planned:
        box, flip = self.transform.params(data, epoch, index)
        return data, box, flip, index  # bytes: the DataLoader hands them over as they are

    def empty_batch(self, batch: int) -> list[Planned | None]:
        return [None] * batch


class DaliDecoder:
    """A DALI pipeline: encoded images + boxes + flips -> ``uint8 [B, 3, size, size]`` on ``device``.

    ``device`` CPU: DALI's CPU pipeline (``device_id=None``); CUDA: the ``mixed`` decoder (nvJPEG,
    the A100/H100 hardware JPEG decoder where present) and resize on that GPU.
    """

    def __init__(
        self, size: int, max_batch_size: int, device: torch.device, num_threads: int, seed: int
    ) -> None:
        from nvidia.dali import fn, pipeline_def, types

        self.size, self.device = size, device
        on_gpu = device.type == "cuda"
        device_id = (device.index or 0) if on_gpu else None

        # prefetch_queue_depth=1: each run() decodes the batch just fed; the overlap with the step
        # comes from the DataLoader workers reading ahead and the GPU running the step async.
        @pipeline_def(
            batch_size=max_batch_size,
            num_threads=num_threads,
            device_id=device_id,
            seed=seed,
            prefetch_queue_depth=1,
        )
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            start = fn.external_source(name="start", dtype=types.INT32)
            shape = fn.external_source(name="shape", dtype=types.INT32)
            mirror = fn.external_source(name="mirror", dtype=types.INT32)
            images = fn.decoders.image_slice(
                encoded,
                start=start,
                shape=shape,
                axis_names="WH",
                device="mixed" if on_gpu else "cpu",
                output_type=types.RGB,
                # The boxes are drawn on the stored size, as the CPU path (which ignores EXIF).
                adjust_orientation=False,
            )
            images = fn.resize(
                images,
                size=[size, size],
                interp_type=types.INTERP_LINEAR,
                antialias=True,
                dtype=types.UINT8,
            )
            return fn.crop_mirror_normalize(
                images, mirror=mirror, output_layout="CHW", dtype=types.UINT8
            )

        self.pipeline = pipeline()
        self.pipeline.build()

    def __call__(self, batch: list[Planned]) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        encoded, boxes, flips, _ = zip(*batch, strict=True)
        boxes = np.asarray(boxes, dtype=np.int32)  # (left, top, width, height)
        self.pipeline.feed_input("encoded", [np.frombuffer(data, np.uint8) for data in encoded])
        self.pipeline.feed_input("start", list(boxes[:, :2]))
        self.pipeline.feed_input("shape", list(boxes[:, 2:]))
        self.pipeline.feed_input("mirror", [np.int32(flip) for flip in flips])
        (images,) = self.pipeline.run()
        out = torch.empty(
            (len(batch), 3, self.size, self.size), dtype=torch.uint8, device=self.device
        )
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        # On the GPU: an async copy on the training stream, ordered before the step that reads it.
        return feed_ndarray(images.as_tensor(), out, cuda_stream=stream)


class DaliStreamingLoader(StreamingLoader):
    """:class:`StreamingLoader` with the decode in DALI (:class:`DaliDecoder`); same arguments,
    order, state and resume. ``num_workers``: the reading workers, and DALI's CPU threads."""

    def __init__(self, source, transform: Transform, *args, **kwargs) -> None:
        super().__init__(source, _Plans(transform), *args, **kwargs)
        self._decoder: DaliDecoder | None = None  # built at the first pass, kept

    def _host_batches(self) -> Iterator:
        if self._decoder is None:
            # A run through DALI ended with its decode workers alive at exit (they ignore SIGTERM)
            # and multiprocessing's exit handler joined them forever: stop them first (atexit
            # runs the handlers registered last first).
            atexit.register(self._stop_workers)
            self._decoder = DaliDecoder(
                self.transform.size,
                self.micro_batch_size,
                self.device,
                num_threads=max(1, self.num_workers),
                seed=self.seed,
            )
        batches = super()._host_batches()
        for plans, labels, skipped, error in batches:
            if error is None:
                try:
                    images = self._decoder(plans)
                except RuntimeError as dali_error:
                    error = self._unreadable(str(dali_error), plans)
            if error is not None:
                # The workers ignore SIGTERM: stop them through their queues before the error is
                # raised (StreamingLoader does; it cannot reach them through this generator).
                shutdown = getattr(batches, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
                yield None, None, skipped, error
                return
            yield images, labels, skipped, None

    def _stop_workers(self) -> None:
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def _unreadable(self, message: str, plans: list[Planned]) -> str:
        """One line for DALI's multi-line error: the file (DALI names the sample of the batch) and
        the cause (after the operator's traceback: "encountered:", a blank line, the cause)."""
        _, found, cause = message.partition("encountered:")
        lines = [line.strip() for line in (cause if found else message).splitlines()]
        cause = next((line for line in lines if line), "unknown error")
        sample = re.search(r"sample #(\d+)", cause)
        if sample is None or int(sample[1]) >= len(plans):
            return f"DALI could not decode a micro batch of epoch {self.epoch}: {cause}"
        where = self.source.describe(plans[int(sample[1])][3])
        return f"unreadable image {where}: DALI: {cause} (data.decoder=cpu with data.bad_images=skip skips such images)"
