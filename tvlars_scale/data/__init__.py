"""Image datasets: decoded once into uint8 tensors (small data) or streamed from disk (ImageNet);
rank-sharded micro batches; on-device augmentation."""

from tvlars_scale.data.augment import BatchAugment
from tvlars_scale.data.loader import PAD_LABEL, EpochShards, MicroBatchLoader
from tvlars_scale.data.sources import DATASETS, load_image_data
from tvlars_scale.data.stream_loader import StreamingLoader, Transform
from tvlars_scale.data.streaming import StreamingData, open_streaming
from tvlars_scale.data.types import DataError, DatasetInfo, ImageData

__all__ = [
    "DATASETS",
    "PAD_LABEL",
    "BatchAugment",
    "DataError",
    "DatasetInfo",
    "EpochShards",
    "ImageData",
    "MicroBatchLoader",
    "StreamingData",
    "StreamingLoader",
    "Transform",
    "load_image_data",
    "open_streaming",
]
