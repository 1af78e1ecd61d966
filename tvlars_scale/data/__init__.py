"""Datasets decoded once into uint8 tensors, rank-sharded micro batches, on-device augmentation."""

from tvlars_scale.data.augment import BatchAugment
from tvlars_scale.data.loader import PAD_LABEL, MicroBatchLoader
from tvlars_scale.data.sources import DATASETS, load_image_data
from tvlars_scale.data.types import DataError, DatasetInfo, ImageData

__all__ = [
    "DATASETS",
    "PAD_LABEL",
    "BatchAugment",
    "DataError",
    "DatasetInfo",
    "ImageData",
    "MicroBatchLoader",
    "load_image_data",
]
