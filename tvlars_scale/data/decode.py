"""One encoded image -> one ``uint8 [C, S, S]`` crop: reduced-size JPEG decode, crop, resize, flip.

This runs per sample in ``DataLoader`` worker processes (:mod:`tvlars_scale.data.stream_loader`).
The crop box is chosen on the image's header size BEFORE decoding, so that the JPEG can be decoded
at the smallest DCT scale (1/2, 1/4, 1/8 ...) that still leaves the crop at least ``S`` pixels on
each side: libjpeg-turbo then skips most of the inverse DCT work (a 2000 x 1500 photo cropped to a
224 px training sample decodes at 1/4 or 1/8 size). JPEGs go through ``simplejpeg`` (libjpeg-turbo's
TurboJPEG API, no PIL objects); anything else -- PNG (ImageNet has a PNG named ``.JPEG``), CMYK /
YCCK JPEGs (TurboJPEG cannot convert them to RGB), other formats -- through PIL, with ``draft`` for
the same DCT scaling. Grayscale becomes RGB. The resize is PyTorch's antialiased bilinear on
``uint8`` channels-last (an AVX2 kernel, about 3x faster than PIL's ``resize`` here).

Randomness: :func:`random_resized_crop` is torchvision's ``RandomResizedCrop.get_params``
algorithm, drawing from the numpy generator it is given; the loader seeds that generator from
(seed, epoch, sample index), so a sample's crop does not depend on which worker, rank or micro batch
decodes it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:  # libjpeg-turbo's fast path; PIL (slower, same geometry) when it is not installed
    import simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is a dependency; kept optional on purpose
    simplejpeg = None

__all__ = [
    "BadImageError",
    "Box",
    "center_crop_box",
    "decode_crop",
    "decode_crops",
    "image_size",
    "random_resized_crop",
]

Box = tuple[int, int, int, int]
"""``(left, top, width, height)`` in pixels of the full-size image."""

JPEG_MAGIC = b"\xff\xd8"
# TurboJPEG converts these colour spaces to RGB itself; CMYK and YCCK go through PIL.
TURBO_COLORSPACES = ("Gray", "YCbCr", "RGB")


class BadImageError(ValueError):
    """The bytes are not a decodable image (truncated, corrupt, unknown format)."""


def _is_turbo_jpeg(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a JPEG that TurboJPEG decodes to RGB, else None."""
    if simplejpeg is None or not data.startswith(JPEG_MAGIC):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # let PIL try, and report its error
    return (width, height) if colorspace in TURBO_COLORSPACES else None


def image_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from the header only (no pixel is decoded)."""
    size = _is_turbo_jpeg(data)
    if size is not None:
        return size
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
        raise BadImageError(f"{type(error).__name__}: {error}") from None


def random_resized_crop(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """torchvision's ``RandomResizedCrop.get_params``: ten tries, then the central crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback: the whole image, cropped to the ratio range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, size: int, resize: int) -> Box:
    """The box that ``Resize(resize)`` then ``CenterCrop(size)`` keep, in full-size pixels."""
    side = min(width, height) * size / resize  # the crop's side before the resize
    w, h = min(width, round(side)), min(height, round(side))
    return (width - w) // 2, (height - h) // 2, w, h


def _decode_rgb(data: bytes, min_size: tuple[int, int]) -> np.ndarray:
    """``uint8 [H', W', 3]``, decoded at the smallest DCT scale with ``H' >= min_h, W' >= min_w``."""
    min_w, min_h = min_size
    if _is_turbo_jpeg(data) is not None:
        try:
            return simplejpeg.decode_jpeg(data, "RGB", min_height=min_h, min_width=min_w)
        except ValueError:
            # TurboJPEG fails on any libjpeg warning, also harmless ones ImageNet has ("extraneous
            # bytes before marker"): PIL decides, and raises for a truly truncated file.
            pass
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":
                image.draft("RGB", (min_w, min_h))  # DCT scaling; no-op for other formats
            # CMYK, grayscale, palette, RGBA... -> RGB (PIL's conversions, e.g. CMYK inverted).
            return np.array(image.convert("RGB"))
    except Exception as error:  # truncated ("image file is truncated"), unknown format...
        raise BadImageError(f"{type(error).__name__}: {error}") from None


def decode_crop(data: bytes, box: Box, size: int, flip: bool = False) -> torch.Tensor:
    """Decode ``data``, keep ``box`` (full-size pixels), resize to ``size`` x ``size``, mirror.

    Returns ``uint8 [3, size, size]`` (contiguous). Raises :class:`BadImageError`.
    """
    return decode_crops(data, [(box, flip)], size)[0]


def decode_crops(data: bytes, crops: Sequence[tuple[Box, bool]], size: int) -> list[torch.Tensor]:
    """:func:`decode_crop` for several ``(box, flip)`` of one image (Barlow Twins' two views),
    decoded ONCE, at the DCT scale that keeps the smallest box >= ``size`` pixels."""
    width, height = image_size(data)
    # Smallest decoded size that keeps every box >= size pixels on both sides.
    factor = size / min(min(w, h) for (_, _, w, h), _ in crops)
    pixels = _decode_rgb(data, (math.ceil(width * factor), math.ceil(height * factor)))
    return [_crop_resize(pixels, (width, height), box, size, flip) for box, flip in crops]


def _crop_resize(
    pixels: np.ndarray, full_size: tuple[int, int], box: Box, size: int, flip: bool
) -> torch.Tensor:
    """``box`` (full-size pixels) of the decoded ``pixels``, resized to ``size``, mirrored."""
    width, height = full_size
    left, top, w, h = box
    scale_y, scale_x = pixels.shape[0] / height, pixels.shape[1] / width
    x0, y0 = math.floor(left * scale_x), math.floor(top * scale_y)
    x1 = max(x0 + 1, min(pixels.shape[1], math.ceil((left + w) * scale_x)))
    y1 = max(y0 + 1, min(pixels.shape[0], math.ceil((top + h) * scale_y)))
    crop = torch.from_numpy(pixels[y0:y1, x0:x1]).permute(2, 0, 1).unsqueeze(0)
    # channels_last uint8 + antialias takes PyTorch's vectorised path (no float copy).
    crop = crop.contiguous(memory_format=torch.channels_last)
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
    if flip:
        out = out.flip(-1)
    return out[0].contiguous()
