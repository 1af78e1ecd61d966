"""Hugging Face ``datasets`` sources (hub id or local copy) -> decoded uint8 tensors."""

from __future__ import annotations

import os

import datasets
import numpy as np
import torch
from PIL import Image

from tvlars_scale.data.types import DataError

# Split names seen in the wild: uoft-cs/cifar10 has "test", zh-plus/tiny-imagenet has "valid",
# and an image-folder tree with a "valid" directory loads as "validation".
TEST_SPLITS = ("test", "validation", "valid")
DECODE_BATCH = 1024
# Files `save_to_disk` writes: a DatasetDict directory has the first, a single Dataset the second.
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")


def load_hub_images(
    name: str, source: str, in_chans: int, side: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Decode the train and test splits of ``source`` into uint8 ``[N, C, side, side]`` tensors.

    Returns ``(train_images, train_labels, test_images, test_labels, num_classes)``.
    """
    splits = open_splits(name, source)
    train, test = splits["train"], splits[eval_split_name(name, source, splits, TEST_SPLITS)]
    image_column, label_column = image_label_columns(name, source, train)
    mode = "RGB" if in_chans == 3 else "L"
    train_x, train_y = _decode(train, image_column, label_column, mode, side)
    test_x, test_y = _decode(test, image_column, label_column, mode, side)
    label_feature = train.features[label_column]
    if isinstance(label_feature, datasets.ClassLabel):
        num_classes = label_feature.num_classes
    else:
        num_classes = int(train_y.max()) + 1  # host sync: CPU tensor, once at load time
    return train_x, train_y, test_x, test_y, num_classes


def eval_split_name(
    name: str, source: str, splits: datasets.DatasetDict, candidates: tuple[str, ...]
) -> str:
    """The first of ``candidates`` that ``splits`` holds; DataError if it has no train split or none."""
    if "train" not in splits:
        raise DataError(f"{name}: '{source}' has no 'train' split (splits: {', '.join(splits)})")
    found = next((s for s in candidates if s in splits), None)
    if found is None:
        raise DataError(
            f"{name}: '{source}' has no test split named {' / '.join(candidates)} "
            f"(splits: {', '.join(splits)})"
        )
    return found


def open_splits(name: str, source: str) -> datasets.DatasetDict:
    """Open a saved dataset directory, a local folder or a hub id; DataError if none works."""
    is_local = os.path.isdir(source)
    if not is_local and source.startswith((os.sep, ".", "~")):
        raise DataError(f"{name}: no such directory '{source}' (see README 'Data')")
    try:
        if is_local and any(
            os.path.exists(os.path.join(source, marker)) for marker in SAVED_DATASET_MARKERS
        ):
            splits = datasets.load_from_disk(source)
        else:
            splits = datasets.load_dataset(source)
    except Exception as error:  # datasets raises many types (OSError, ConnectionError, ...)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        where = "local folder" if is_local else "hub id"
        raise DataError(
            f"{name}: cannot load {where} '{source}' ({type(error).__name__}: {reason}); "
            "pass a local copy as the data path (see README 'Data')"
        ) from error
    if not isinstance(splits, datasets.DatasetDict):
        raise DataError(f"{name}: '{source}' holds one split; save a DatasetDict with train/test")
    return splits


def image_label_columns(name: str, source: str, split: datasets.Dataset) -> tuple[str, str]:
    """The image column (an Image feature) and the label column (a ClassLabel, else 'label')."""
    features = split.features
    image_column = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    label_column = next(
        (c for c, f in features.items() if isinstance(f, datasets.ClassLabel)),
        "label" if "label" in features else None,
    )
    if image_column is None or label_column is None:
        raise DataError(
            f"{name}: '{source}' needs an Image column and a label column "
            f"(columns: {', '.join(features)})"
        )
    return image_column, label_column


def _decode(
    split: datasets.Dataset, image_column: str, label_column: str, mode: str, side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image once: PIL in batches, converted to ``mode`` and resized to ``side``."""
    # Tiny ImageNet holds some grayscale JPEGs; the feature's mode converts them to RGB at decode.
    split = split.select_columns([image_column, label_column])
    split = split.cast_column(image_column, datasets.Image(mode=mode))
    channels = len(mode)  # one byte per channel: "L" -> 1, "RGB" -> 3
    images = np.empty((len(split), side, side, channels), dtype=np.uint8)
    labels = np.empty(len(split), dtype=np.int64)
    start = 0
    for batch in split.iter(batch_size=DECODE_BATCH):
        for offset, image in enumerate(batch[image_column]):
            if image.size != (side, side):
                image = image.resize((side, side), Image.Resampling.BILINEAR)
            images[start + offset] = np.asarray(image).reshape(side, side, channels)
        labels[start : start + len(batch[label_column])] = batch[label_column]
        start += len(batch[label_column])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)
