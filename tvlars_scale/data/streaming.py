"""Datasets read by index from disk: an image-folder tree or a Hugging Face ``datasets`` dataset.

For data that does not fit in memory (ImageNet-1k: 1.28M JPEGs, ~140 GB), nothing is decoded up
front. A source holds only what indexing needs -- every sample's label (``int64``, 10 MB for
ImageNet) and a way to fetch its encoded bytes -- and the bytes are read and decoded per sample in
``DataLoader`` workers (:mod:`tvlars_scale.data.stream_loader`):

* :class:`FolderSource`: ``ROOT/<split>/<class>/<file>``; the relative paths are packed into ONE
  ``bytes`` buffer plus an offset array, not a Python list of strings, so forked workers do not
  touch (and copy) millions of reference-counted objects;
* :class:`ArrowSource`: a split of a ``datasets`` dataset (hub id such as ``ILSVRC/imagenet-1k``, a
  ``save_to_disk`` directory, Parquet files); Arrow tables are memory-mapped, so random access
  costs no resident memory beyond the pages read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from tvlars_scale.data.types import DataError

__all__ = ["ArrowSource", "FolderSource", "StreamingData", "open_streaming"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
EVAL_SPLITS = ("val", "validation", "valid", "test")
"""Evaluation split names, in order of preference (ImageNet's hub copy has an unlabelled test)."""
# torchvision's ImageNet statistics, as MLPerf's reference and most ImageNet recipes use them: a
# pass over 1.28M images to measure them again would cost as much as an epoch.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FolderSource:
    """One split of an image-folder tree: ``root/<class>/<file>``, classes by directory name."""

    def __init__(self, root: str, classes: list[str]) -> None:
        self.root = root
        index = {name: label for label, name in enumerate(classes)}
        paths: list[bytes] = []
        labels: list[int] = []
        for name in sorted(os.listdir(root)):
            directory = os.path.join(root, name)
            if not os.path.isdir(directory):
                continue
            if name not in index:
                raise DataError(f"class directory '{directory}' is not a class of the train split")
            files = sorted(
                entry.name
                for entry in os.scandir(directory)
                if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
            )
            paths += [f"{name}/{file}".encode() for file in files]
            labels += [index[name]] * len(files)
        if not paths:
            raise DataError(f"no image files under '{root}' (expected {root}/<class>/<image>)")
        lengths = np.fromiter((len(p) for p in paths), dtype=np.int64, count=len(paths))
        self._offsets = np.concatenate([[0], np.cumsum(lengths)])
        self._blob = b"".join(paths)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> str:
        start, end = self._offsets[index], self._offsets[index + 1]
        return os.path.join(self.root, self._blob[start:end].decode())

    def read(self, index: int) -> bytes:
        with open(self.path(index), "rb") as file:
            return file.read()

    def describe(self, index: int) -> str:
        return self.path(index)


class ArrowSource:
    """One split of a ``datasets`` dataset, its image column read as encoded bytes."""

    def __init__(self, split, image_column: str, label_column: str, where: str) -> None:
        import datasets

        self.where = where
        self.labels = np.asarray(split.data.column(label_column).to_numpy(), dtype=np.int64)
        # decode=False: the column yields {"bytes", "path"}; decoding is ours, in the workers.
        split = split.select_columns([image_column])
        self.split = split.cast_column(image_column, datasets.Image(decode=False))
        self.column = image_column

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> bytes:
        item = self.split[int(index)][self.column]
        if item.get("bytes") is not None:
            return item["bytes"]
        with open(item["path"], "rb") as file:  # a dataset that stores paths only
            return file.read()

    def describe(self, index: int) -> str:
        return f"{self.where}[{index}]"


@dataclass
class StreamingData:
    """A dataset read from disk while training: what the trainer, the task and the model read of
    :class:`~tvlars_scale.data.types.ImageData`, without the decoded images."""

    train: FolderSource | ArrowSource
    test: FolderSource | ArrowSource
    num_classes: int
    image_size: int
    """Side of the training crops and of the evaluation centre crops, in pixels."""
    name: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    in_chans: int = 3
    augmented_in_loader: bool = True
    """Crop and flip happen in the loader's workers: the task only normalises on the device."""

    @property
    def train_labels(self) -> torch.Tensor:
        return torch.from_numpy(self.train.labels)

    @property
    def test_labels(self) -> torch.Tensor:
        return torch.from_numpy(self.test.labels)


def _folder_split(root: str, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if os.path.isdir(os.path.join(root, n))), None)


def _is_folder_tree(path: str) -> bool:
    train = os.path.join(path, "train")
    return os.path.isdir(train) and any(entry.is_dir() for entry in os.scandir(train))


def open_streaming(name: str, path: str, image_size: int) -> StreamingData:
    """Open ``path`` (image-folder root, ``save_to_disk`` directory, Parquet folder or hub id)."""
    if not os.path.isdir(path) and path.startswith((os.sep, ".", "~")):
        raise DataError(f"{name}: no such directory '{path}'")
    if os.path.isdir(path) and (_is_folder_tree(path) or not _has_dataset_files(path)):
        return _open_folder(name, path, image_size)
    from tvlars_scale.data.hub import eval_split_name, image_label_columns, open_splits

    splits = open_splits(name, path)
    test_name = eval_split_name(name, path, splits, EVAL_SPLITS)
    train_split = splits["train"]
    image_column, label_column = image_label_columns(name, path, train_split)
    train = ArrowSource(train_split, image_column, label_column, f"{path} train")
    test = ArrowSource(splits[test_name], image_column, label_column, f"{path} {test_name}")
    if len(test.labels) and test.labels.min() < 0:
        raise DataError(f"{name}: '{path}' split '{test_name}' is unlabelled (labels < 0)")
    feature = train_split.features[label_column]
    num_classes = getattr(feature, "num_classes", None) or int(train.labels.max()) + 1
    return StreamingData(train, test, num_classes, image_size, name)


def _has_dataset_files(path: str) -> bool:
    """A directory ``datasets`` may load (saved dataset, Parquet/Arrow files, a loading script)."""
    for _, _, files in os.walk(path):
        if any(f.endswith((".json", ".parquet", ".arrow", ".py", ".csv")) for f in files):
            return True
    return False


def _open_folder(name: str, root: str, image_size: int) -> StreamingData:
    if not os.path.isdir(os.path.join(root, "train")):
        found = ", ".join(sorted(os.listdir(root))) or "nothing"
        raise DataError(f"{name}: '{root}' has no 'train' directory (found: {found})")
    test_dir = _folder_split(root, EVAL_SPLITS)
    if test_dir is None:
        raise DataError(
            f"{name}: '{root}' has no evaluation directory named {' / '.join(EVAL_SPLITS)}"
        )
    train_root = os.path.join(root, "train")
    classes = sorted(e.name for e in os.scandir(train_root) if e.is_dir())
    if not classes:
        raise DataError(f"{name}: '{train_root}' has no class directories")
    train = FolderSource(train_root, classes)
    test = FolderSource(os.path.join(root, test_dir), classes)
    return StreamingData(train, test, len(classes), image_size, name)
