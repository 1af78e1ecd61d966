"""Datasets decoded once into uint8 tensors, rank-sharded micro batches, on-device augmentation."""

from tvlars_scale.data.augment import BatchAugment
from tvlars_scale.data.loader import PAD_LABEL, MicroBatchLoader
from tvlars_scale.data.sources import DATASETS, DataError, DatasetInfo, ImageData, load_image_data

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
