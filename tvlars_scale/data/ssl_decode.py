"""Barlow Twins' two views of a streamed sample, cut in the loader's decode workers.

The workers do what needs the encoded file: per view, a random-resized crop box and a flip, then
ONE decode of the JPEG (at the DCT scale the smaller box needs) cut into both crops, resized and
flipped in ``uint8`` (:func:`~tvlars_scale.data.decode.decode_crops`). They also draw each view's
photometric parameters (colour jitter, grayscale, blur, solarization); the device applies them to
whole batches with the in-memory path's own tensor code (:func:`~tvlars_scale.data.ssl_views.photometric`),
so a worker ships two ``uint8`` crops and 16 floats per sample, and the per-pixel float work runs
where it is cheap.

Every random number comes from one numpy generator seeded with (seed, epoch, sample index), as
the classification transform's (:class:`~tvlars_scale.data.stream_loader.Transform`): a sample's
two views do not depend on the worker, the rank, the micro batch or the world size, no worker
state is saved, and a resume mid-epoch decodes what the uninterrupted run would have.

Against the in-memory recipe (:class:`~tvlars_scale.data.ssl_views.TwoViewAugment`), on purpose:
the crop box is torchvision's ``RandomResizedCrop`` (ten tries, then the central crop; the reference
Barlow Twins code uses it) on the full-size image, where the in-memory path clamps and crops the
already-small image with ``grid_sample``; the resize is antialiased bilinear in ``uint8`` (the
reference: bicubic on PIL images). The photometric distributions and their application are the
same code path and the same order (brightness, contrast, saturation, hue, then grayscale, blur,
solarization), drawn from numpy instead of the torch generator.
"""

from __future__ import annotations

import numpy as np
import torch

from tvlars_scale.data.decode import decode_crops, image_size, random_resized_crop
from tvlars_scale.data.ssl_views import (
    PHOTOMETRIC_PARAMS,
    DecodedViews,
    SSLAugmentConfig,
    draw_photometric,
)

__all__ = ["TwoViewTransform"]


class TwoViewTransform:
    """A sample's bytes -> :class:`DecodedViews` of one sample (``uint8 [2, 3, S, S]`` crops and
    ``float32 [2, 8]`` photometric parameters). Picklable, so it travels to the workers."""

    train = True

    def __init__(self, cfg: SSLAugmentConfig, seed: int = 0) -> None:
        self.cfg, self.seed, self.size = cfg, seed, cfg.size

    def empty_batch(self, size: int) -> DecodedViews:
        """A micro batch of ``size`` samples to decode into."""
        side = self.size
        crops = torch.empty((size, len(self.cfg.views), 3, side, side), dtype=torch.uint8)
        params = torch.empty((size, len(self.cfg.views), len(PHOTOMETRIC_PARAMS)))
        return DecodedViews(crops, params)

    def __call__(self, data: bytes, epoch: int, index: int) -> DecodedViews:
        cfg = self.cfg
        width, height = image_size(data)
        # One generator per (seed, epoch, sample), drawn in a fixed order: view 1 (box, flip,
        # photometric parameters), then view 2.
        rng = np.random.default_rng([self.seed, epoch, int(index)])
        crops, params = [], []
        for recipe in cfg.views:
            box = random_resized_crop(width, height, rng, cfg.crop_scale, cfg.crop_ratio)
            crops.append((box, bool(rng.random() < cfg.flip_prob)))
            params.append(draw_photometric(rng, cfg, recipe))
        views = decode_crops(data, crops, cfg.size)
        return DecodedViews(torch.stack(views), torch.from_numpy(np.stack(params)))
