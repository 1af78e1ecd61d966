"""The data package's shared types: its error, what a dataset name means, a decoded dataset.

They live apart from :mod:`tvlars_scale.data.sources` so that :mod:`tvlars_scale.data.hub`, which
``sources`` imports, can use them without importing ``sources`` back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DataError", "DatasetInfo", "ImageData"]


class DataError(ValueError):
    """A dataset cannot be loaded; the message is one line naming the dataset and the source."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset name means before anything is loaded (:func:`load_image_data` reads it)."""

    num_classes: int
    """Classes of the full dataset (a local subset may hold fewer; ImageData reports what it holds)."""
    image_size: int
    """Native side length in pixels; ``load_image_data(image_size=...)`` resizes to another."""
    in_chans: int
    """Colour channels after decoding (grayscale images of an RGB dataset are converted)."""
    hub_id: str | None = None
    """Default Hugging Face hub id; None for data that is embedded or generated."""


@dataclass
class ImageData:
    """A decoded image classification dataset: uint8 images on the CPU, int64 labels."""

    train_images: torch.Tensor
    """uint8 ``[N, C, H, W]``."""
    train_labels: torch.Tensor
    """int64 ``[N]`` in ``[0, num_classes)``."""
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    """Per-channel mean of the training images on the 0..1 scale (what BatchAugment subtracts)."""
    std: tuple[float, ...]
    """Per-channel standard deviation of the training images on the 0..1 scale."""
    name: str
    augmented_in_loader: bool = False
    """True when the loader already cropped and flipped (streaming); the task then only normalises."""

    @property
    def in_chans(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]
