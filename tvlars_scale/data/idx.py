"""IDX files (the MNIST / Fashion-MNIST format), gzipped or not -> uint8 tensors.

An IDX file is two zero bytes, a type byte (0x08: unsigned byte, the only type these datasets
use), the number of dimensions, each dimension as a big-endian uint32, then the values row-major.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch

from tvlars_scale.data.types import DataError

UBYTE = 0x08
# (images, labels) of each split, as Zalando and Debian name them; each may also end in ".gz".
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str) -> np.ndarray:
    """The array an IDX file holds (``.gz``: decompressed); DataError if it is not a uint8 IDX file."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise DataError(
            f"cannot read IDX file '{path}' ({type(error).__name__}: {error})"
        ) from error
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != UBYTE:
        raise DataError(f"'{path}' is not an unsigned-byte IDX file (header {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"'{path}': shape {shape} needs {expected} bytes, the file has {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_idx_file(directory: str, stem: str) -> str | None:
    """``directory/stem`` or ``directory/stem.gz``, whichever exists (the plain file first)."""
    for name in (stem, stem + ".gz"):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def has_idx_files(directory: str) -> bool:
    """Whether ``directory`` holds the training images of an IDX dataset (so it is one)."""
    return find_idx_file(directory, IDX_FILES["train"][0]) is not None


def load_idx_dir(name: str, directory: str) -> tuple[torch.Tensor, ...]:
    """``(train_x, train_y, test_x, test_y)`` from the four IDX files of ``directory``:
    images as uint8 ``[N, 1, H, W]``, labels as int64 ``[N]``."""
    tensors = []
    for split, (image_stem, label_stem) in IDX_FILES.items():
        paths = {stem: find_idx_file(directory, stem) for stem in (image_stem, label_stem)}
        missing = [stem for stem, path in paths.items() if path is None]
        if missing:
            raise DataError(f"{name}: '{directory}' has no {' or '.join(missing)}[.gz]")
        images, labels = (read_idx(path) for path in paths.values())
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{name}: {split} images {images.shape} and labels {labels.shape} in "
                f"'{directory}' are not [N, H, W] and [N]"
            )
        tensors += [
            torch.from_numpy(images.copy()).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)),
        ]
    return tuple(tensors)
