"""Two augmented views per image for Barlow Twins, drawn for whole batches on the device.

The recipe is the Barlow Twins one (Zbontar et al., 2021, and its reference code): random resized
crop, horizontal flip, colour jitter (p 0.8; brightness 0.4, contrast 0.4, saturation 0.2, hue
0.1), grayscale (p 0.2), Gaussian blur (p 1.0 on the first view, 0.1 on the second) and
solarization (p 0.0 / 0.2). Every random parameter is drawn per sample as a tensor and applied with
batched tensor math (``affine_grid``/``grid_sample`` for crops, mask blends for the rest): no
per-sample Python, no host sync, one kernel sequence per batch whatever its size. torchvision's
functional ops apply ONE parameter to a whole batch, which is why they are not used.

Differences from torchvision's PIL pipeline, on purpose:
- crop sizes outside the image are clamped instead of re-drawn (torchvision retries ten times);
- colour jitter applies brightness, contrast, saturation, hue in this fixed order (torchvision
  permutes the order per sample);
- bilinear crops without antialiasing (the crops are up-sampled at 32 and 64 px, so it matters
  little).

Streamed data (:mod:`tvlars_scale.data.ssl_decode`): the decode workers cut the crops and draw
every view's photometric parameters (:func:`draw_photometric`); :class:`TwoViewAugment` then applies
them with the same :func:`photometric` as the in-memory views, which draw theirs here.

Sizes: :func:`recipe_for_image_size` picks the blur kernel as ~10% of the side (23 px at 224 in
the paper recipe: 7 px at 64) and switches blur off at 32 px and below, as CIFAR Barlow Twins
recipes do (a 3 px kernel with sigma up to 2 only smears 32 px images); very small images (the
8 px digits) also get a milder minimum crop scale.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

GRAYSCALE_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class ViewRecipe:
    """The probabilities that differ between the two views (the recipe is asymmetric)."""

    blur_prob: float
    solarize_prob: float


@dataclass(frozen=True)
class SSLAugmentConfig:
    size: int
    """Output side in pixels."""
    mean: tuple[float, ...]
    """Per-channel mean subtracted at the end (0..1 scale)."""
    std: tuple[float, ...]
    """Per-channel standard deviation divided at the end (0..1 scale)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Range of the crop's area as a fraction of the image."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Range of the crop's aspect ratio (sampled log-uniformly)."""
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_kernel_size: int = 0
    """Odd kernel side of the Gaussian blur; 0 switches blur off."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_threshold: float = 0.5
    views: tuple[ViewRecipe, ViewRecipe] = field(
        default=(ViewRecipe(blur_prob=1.0, solarize_prob=0.0), ViewRecipe(0.1, 0.2))
    )


def recipe_for_image_size(
    size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> SSLAugmentConfig:
    """The Barlow Twins recipe scaled to ``size`` px (see the module docstring)."""
    blur_kernel = 0 if size <= 32 else 2 * round(0.05 * size) + 1
    min_scale = 0.08 if size >= 32 else 0.3  # an 8% crop of an 8x8 digit is a single pixel
    return SSLAugmentConfig(
        size=size, mean=mean, std=std, crop_scale=(min_scale, 1.0), blur_kernel_size=blur_kernel
    )


def barlow_twins_recipe(
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    flip: bool = True,
    crop_scale: tuple[float, float] | None = None,
) -> SSLAugmentConfig:
    """:func:`recipe_for_image_size`, without flips when ``flip`` is false (digits, which
    mirroring turns into other shapes), and with streaming's ``data.crop_scale`` when given."""
    recipe = recipe_for_image_size(size, mean, std)
    if not flip:
        recipe = dataclasses.replace(recipe, flip_prob=0.0)
    if crop_scale is not None:
        recipe = dataclasses.replace(recipe, crop_scale=tuple(crop_scale))
    return recipe


def _rand(n: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    # Drawn on the CPU (a CPU generator: the same views on CPU and GPU, and a small state to
    # checkpoint), then copied to the batch's device: N numbers, no host sync.
    return torch.rand(n, generator=generator).to(like.device, non_blocking=True)


def _uniform(low: float, high: float, n: int, like: Tensor, generator) -> Tensor:
    return _rand(n, like, generator) * (high - low) + low


def _bernoulli(prob: float, n: int, like: Tensor, generator) -> Tensor:
    return _rand(n, like, generator) < prob


def resized_crop_and_flip(images: Tensor, cfg: SSLAugmentConfig, generator=None) -> Tensor:
    """Per-sample random resized crop (and horizontal flip) with one ``grid_sample``."""
    n = images.shape[0]
    area = _uniform(*cfg.crop_scale, n, images, generator)
    log_ratio = _uniform(
        math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), n, images, generator
    )
    ratio = log_ratio.exp()
    width = (area * ratio).sqrt().clamp(max=1.0)  # fractions of the image side
    height = (area / ratio).sqrt().clamp(max=1.0)
    # Crop centres in normalised [-1, 1] coordinates, keeping the crop inside the image.
    center_x = _uniform(-1.0, 1.0, n, images, generator) * (1 - width)
    center_y = _uniform(-1.0, 1.0, n, images, generator) * (1 - height)
    flip = torch.where(_bernoulli(cfg.flip_prob, n, images, generator), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = center_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = center_y
    grid = F.affine_grid(theta, [n, images.shape[1], cfg.size, cfg.size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _grayscale(images: Tensor) -> Tensor:
    if images.shape[1] == 1:
        return images
    weights = images.new_tensor(GRAYSCALE_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def _per_sample(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def _rgb_to_hsv(rgb: Tensor) -> Tensor:
    r, g, b = rgb.unbind(1)
    max_c, min_c = rgb.amax(1), rgb.amin(1)
    delta = max_c - min_c
    saturation = delta / torch.where(max_c > 0, max_c, 1.0)
    safe_delta = torch.where(delta > 0, delta, 1.0)
    rc, gc, bc = (max_c - r) / safe_delta, (max_c - g) / safe_delta, (max_c - b) / safe_delta
    hue = torch.where(max_c == r, bc - gc, torch.where(max_c == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, 0.0)
    return torch.stack([hue, saturation, max_c], 1)


def _hsv_to_rgb(hsv: Tensor) -> Tensor:
    # Branch-free form: channel n in (5, 3, 1) for (r, g, b) is v - v s clamp(min(k, 4 - k), 0, 1)
    # with k = (n + 6 h) mod 6; elementwise, unlike a per-sector lookup table.
    hue, saturation, value = hsv.unsqueeze(2).unbind(1)
    k = (hue.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1) + 6.0 * hue) % 6.0
    return value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def color_jitter(
    images: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor, hue: Tensor
) -> Tensor:
    """torchvision's adjust_brightness/contrast/saturation/hue with one factor per sample."""
    images = (images * _per_sample(brightness)).clamp(0, 1)
    c = _per_sample(contrast)
    images = (c * images + (1 - c) * _grayscale(images).mean((1, 2, 3), keepdim=True)).clamp(0, 1)
    if images.shape[1] == 1:  # saturation and hue do not exist for one channel
        return images
    s = _per_sample(saturation)
    images = (s * images + (1 - s) * _grayscale(images)).clamp(0, 1)
    hsv = _rgb_to_hsv(images)
    shifted = (hsv[:, 0] + hue.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(torch.stack([shifted, hsv[:, 1], hsv[:, 2]], 1))


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with one sigma per sample: a grouped convolution per axis."""
    n, channels, height, width = images.shape
    offsets = torch.arange(kernel_size, device=images.device, dtype=images.dtype)
    offsets = offsets - (kernel_size - 1) / 2
    kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # (N*C, k)
    pad = kernel_size // 2
    flat = F.pad(images.reshape(1, n * channels, height, width), (pad, pad, pad, pad), "reflect")
    flat = F.conv2d(flat, kernel.view(-1, 1, kernel_size, 1), groups=n * channels)
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, kernel_size), groups=n * channels)
    return flat.view_as(images)


def _where_per_sample(chosen: Tensor, changed: Tensor, images: Tensor) -> Tensor:
    return torch.where(_per_sample(chosen), changed, images)


PHOTOMETRIC_PARAMS = (
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "grayscale",
    "blur_sigma",
    "blur",
    "solarize",
)
"""A view's per-sample parameters after its crop: the columns of a float ``[N, 8]`` tensor
(jitter factors already the identity where the sample is not jittered; the coins 0 or 1)."""


class DecodedViews(NamedTuple):
    """Two views cut in the streaming loader's workers, their photometric part still to apply.

    ``crops``: ``uint8 [N, 2, C, S, S]``, each view's random-resized crop (and flip);
    ``params``: ``float32 [N, 2, 8]``, each view's :data:`PHOTOMETRIC_PARAMS`. One sample is the
    same without the first dimension. A named tuple: the DataLoader pins it as one.
    """

    crops: Tensor
    params: Tensor


def draw_photometric(
    rng: np.random.Generator, cfg: SSLAugmentConfig, recipe: ViewRecipe
) -> np.ndarray:
    """One sample's :data:`PHOTOMETRIC_PARAMS` for one view, from a numpy generator (the decode
    workers' per-sample draw; the same distributions as :meth:`TwoViewAugment.view`'s)."""
    jitter = rng.random() < cfg.jitter_prob

    def factor(strength: float) -> float:
        value = rng.uniform(max(0.0, 1 - strength), 1 + strength)
        return value if jitter else 1.0

    brightness, contrast, saturation = map(factor, (cfg.brightness, cfg.contrast, cfg.saturation))
    hue = rng.uniform(-cfg.hue, cfg.hue)
    grayscale = rng.random() < cfg.grayscale_prob
    blur_sigma = rng.uniform(*cfg.blur_sigma)
    blur = rng.random() < recipe.blur_prob
    solarize = rng.random() < recipe.solarize_prob
    values = (brightness, contrast, saturation, hue if jitter else 0.0, grayscale, blur_sigma)
    return np.array([*values, blur, solarize], dtype=np.float32)


def photometric(crops: Tensor, params: Tensor, cfg: SSLAugmentConfig, recipe: ViewRecipe) -> Tensor:
    """Colour jitter, grayscale, blur and solarization of cropped 0..1 images with one
    :data:`PHOTOMETRIC_PARAMS` row per sample (``params [N, 8]``), then the normalisation."""
    brightness, contrast, saturation, hue, grayscale, blur_sigma, blur, solarize = params.unbind(1)
    out = color_jitter(crops, brightness, contrast, saturation, hue)
    if out.shape[1] == 3:
        out = _where_per_sample(grayscale > 0, _grayscale(out).expand_as(out), out)
    if cfg.blur_kernel_size and recipe.blur_prob:
        blurred = gaussian_blur(out, blur_sigma, cfg.blur_kernel_size)
        out = _where_per_sample(blur > 0, blurred, out)
    if recipe.solarize_prob:
        solarized = torch.where(out >= cfg.solarize_threshold, 1.0 - out, out)
        out = _where_per_sample(solarize > 0, solarized, out)
    mean = out.new_tensor(cfg.mean).view(1, -1, 1, 1)
    std = out.new_tensor(cfg.std).view(1, -1, 1, 1)
    return (out - mean) / std


class TwoViewAugment:
    """``uint8 (or 0..1 float) [N, C, H, W] -> (view1, view2)``: normalised floats, same device.

    Random parameters come from a CPU generator seeded with ``seed`` (give each rank its own);
    :meth:`state_dict` lets a resumed run draw what the uninterrupted one would have.
    :class:`DecodedViews` (streamed data) carry their crops and parameters: only the photometric
    part runs here, and the generator is not used.
    """

    def __init__(self, cfg: SSLAugmentConfig, seed: int = 0):
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def view(self, images: Tensor, recipe: ViewRecipe) -> Tensor:
        cfg, n, generator = self.cfg, images.shape[0], self.generator

        def uniform(low: float, high: float) -> Tensor:
            return _uniform(low, high, n, images, generator)

        def coin(prob: float) -> Tensor:
            return _bernoulli(prob, n, images, generator)

        out = resized_crop_and_flip(images, cfg, generator)
        jitter = coin(cfg.jitter_prob)  # not jittered: identity factors

        def factor(strength: float) -> Tensor:
            return torch.where(jitter, uniform(max(0.0, 1 - strength), 1 + strength), 1.0)

        # Drawn in this order (the generator's stream); what a recipe switches off is not drawn.
        brightness, contrast, saturation = map(
            factor, (cfg.brightness, cfg.contrast, cfg.saturation)
        )
        hue = torch.where(jitter, uniform(-cfg.hue, cfg.hue), 0.0)
        off = torch.zeros_like(hue)
        grayscale = coin(cfg.grayscale_prob) if out.shape[1] == 3 else off
        blur_sigma, blur = off, off
        if cfg.blur_kernel_size and recipe.blur_prob:
            blur_sigma, blur = uniform(*cfg.blur_sigma), coin(recipe.blur_prob)
        solarize = coin(recipe.solarize_prob) if recipe.solarize_prob else off
        params = [brightness, contrast, saturation, hue, grayscale, blur_sigma, blur, solarize]
        return photometric(out, torch.stack([p.to(hue.dtype) for p in params], 1), cfg, recipe)

    def __call__(self, images: Tensor | DecodedViews) -> tuple[Tensor, Tensor]:
        if isinstance(images, DecodedViews):
            crops = images.crops.float().div_(255)
            return tuple(
                photometric(crops[:, k], images.params[:, k], self.cfg, recipe)
                for k, recipe in enumerate(self.cfg.views)
            )
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        first, second = self.cfg.views
        return self.view(images, first), self.view(images, second)
