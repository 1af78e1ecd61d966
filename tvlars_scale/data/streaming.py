"""Datasets read by index from disk: an image-folder tree or a Hugging Face ``datasets`` dataset.

For data that does not fit in memory (ImageNet-1k: 1.28M JPEGs, ~140 GB), nothing is decoded up
front. A source holds only what indexing needs -- every sample's label (``int64``, 10 MB for
ImageNet) and a way to fetch its encoded bytes -- and the bytes are read and decoded per sample in
``DataLoader`` workers (:mod:`tvlars_scale.data.stream_loader`):

* :class:`FolderSource`: ``ROOT/<split>/<class>/<file>``, read through the tree's index
  (:mod:`tvlars_scale.data.index`: listed once, memory-mapped by every rank); the relative paths
  are ONE packed byte buffer plus an offset array, not a Python list of strings, so forked workers
  do not touch (and copy) millions of reference-counted objects;
* :class:`ArrowSource`: a split of a ``datasets`` dataset (hub id such as ``ILSVRC/imagenet-1k``, a
  ``save_to_disk`` directory, Parquet files); Arrow tables are memory-mapped, so random access
  costs no resident memory beyond the pages read.

Opening is two steps so that a job lists and downloads once: :func:`prepare_streaming` (the first
process: lists the tree into its index, or fills the ``datasets`` cache) then :func:`open_prepared`
(every rank: maps what the first prepared, lists nothing). :func:`open_streaming` does both in one
process.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from tvlars_scale.data.index import (
    EVAL_SPLITS,
    SplitIndex,
    default_index_path,
    open_or_build_index,
    read_index,
)
from tvlars_scale.data.types import DataError

__all__ = [
    "ArrowSource",
    "FolderSource",
    "Kind",
    "StreamingData",
    "open_prepared",
    "open_streaming",
    "prepare_streaming",
]
# torchvision's ImageNet statistics, as MLPerf's reference and most ImageNet recipes use them: a
# pass over 1.28M images to measure them again would cost as much as an epoch.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FolderSource:
    """One split of an image-folder tree: ``root/<class>/<file>``, its files from the tree's index."""

    def __init__(self, root: str, split: SplitIndex, digest: str) -> None:
        self.root, self._split, self.digest = root, split, digest
        self.labels = split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self._split.relative_path(index))

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
        self.digest = hashlib.blake2b(self.labels.data, digest_size=16).hexdigest()

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
    def key(self) -> tuple[int, int, int]:
        """``(train size, test size, content hash)``: what every rank must hold alike (the hash in
        56 bits: an int64 whose negation cannot overflow)."""
        both = hashlib.blake2b(f"{self.train.digest} {self.test.digest}".encode(), digest_size=7)
        return len(self.train), len(self.test), int.from_bytes(both.digest(), "little")

    @property
    def train_labels(self) -> torch.Tensor:
        return torch.from_numpy(self.train.labels)

    @property
    def test_labels(self) -> torch.Tensor:
        return torch.from_numpy(self.test.labels)


def _is_folder_tree(path: str) -> bool:
    train = os.path.join(path, "train")
    return os.path.isdir(train) and any(entry.is_dir() for entry in os.scandir(train))


Kind = Literal["folder", "arrow"]
"""How a streaming source is opened: through an image-folder tree's index, or by ``datasets``."""


def prepare_streaming(name: str, path: str, index: str | None = None, say=print) -> Kind:
    """Run ONCE per job, before any rank opens ``path``: an image-folder tree is listed into its
    index file (``index``, default ``path/tvlars-index.arrow``) unless a fresh one is there (then
    nothing is listed). A ``datasets`` source needs nothing prepared: the process that opens it
    first fills the ``datasets`` cache the others then read."""
    if not os.path.isdir(path) and path.startswith((os.sep, ".", "~")):
        raise DataError(f"{name}: no such directory '{path}'")
    if os.path.isdir(path) and (
        os.path.exists(index or default_index_path(path))
        or _is_folder_tree(path)
        or not _has_dataset_files(path)
    ):
        open_or_build_index(name, path, index, say)
        return "folder"
    return "arrow"


def open_prepared(
    name: str, path: str, image_size: int, kind: Kind, index: str | None = None
) -> StreamingData:
    """Open what :func:`prepare_streaming` prepared, on any rank: maps the folder index (lists
    nothing; ``index``, default in the tree's root) or loads the ``datasets`` source."""
    if kind == "arrow":
        return _open_arrow(name, path, image_size)
    mapped = read_index(index or default_index_path(path))
    train = FolderSource(os.path.join(path, "train"), mapped.train, mapped.digest)
    test = FolderSource(os.path.join(path, mapped.eval_split), mapped.test, mapped.digest)
    return StreamingData(train, test, len(mapped.classes), image_size, name)


def open_streaming(
    name: str, path: str, image_size: int, index: str | None = None
) -> StreamingData:
    """Open ``path`` (image-folder root, ``save_to_disk`` directory, Parquet folder or hub id) in
    one process: :func:`prepare_streaming` then :func:`open_prepared`."""
    return open_prepared(name, path, image_size, prepare_streaming(name, path, index), index)


def _open_arrow(name: str, path: str, image_size: int) -> StreamingData:
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
