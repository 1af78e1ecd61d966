"""The index of an image-folder tree, listed once and memory-mapped by every rank.

Listing ImageNet (``ROOT/train/<class>/<file>``: 1,000 directories, 1.28M entries) on every rank of
a 4,096-rank job is 5 billion directory entries at the same moment on the shared file system. So
the tree is listed ONCE -- by rank 0 at start-up, or ahead of the job by ``tvlars-index ROOT`` --
into one file; every rank memory-maps that file and lists nothing.

The file is an Arrow IPC file (``pyarrow``, already installed by ``datasets``): a documented,
versioned format that holds in ONE file what the index is -- per split, the relative paths as one
packed byte buffer plus an ``int64`` offset array (Arrow's ``large_binary`` layout, exactly the
packing the streaming source uses) and the ``int64`` labels -- and that is memory-mapped with no
parsing or copy (``pa.memory_map``; the arrays are numpy views of the mapped pages, shared by a
node's ranks and their forked decode workers through the page cache). NumPy's own format would
need one ``.npy`` file per array (``.npz`` cannot be memory-mapped). The schema's metadata holds the
class names, the eval split's name, each listed directory's modification time and a content hash.

Staleness, on the process that opens the index first only, and without listing: a directory's
mtime changes whenever an entry is added, removed or renamed in it, so the index records the mtime
of every directory it lists (the split directories and each class directory, read BEFORE listing
it), and an index is stale when one of them differs now (``1 + 2 x classes`` stats: 2,002 for
ImageNet, against 1.33M entries listed). A file rewritten in place under the same name does not make
the index stale (the index holds names, not bytes: the bad-image policy covers damaged files). Not
seen: a change within the same mtime tick as the listing (coarse-timestamp file systems);
``tvlars-index`` always lists anew.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from tvlars_scale.data.types import DataError

__all__ = [
    "EVAL_SPLITS",
    "IMAGE_EXTENSIONS",
    "INDEX_FILE",
    "FolderIndex",
    "SplitIndex",
    "default_index_path",
    "make_index",
    "open_or_build_index",
    "pack_split",
    "read_index",
    "scan_tree",
    "stale_reason",
    "write_index",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
EVAL_SPLITS = ("val", "validation", "valid", "test")
"""Evaluation split names, in order of preference (ImageNet's hub copy has an unlabelled test)."""
INDEX_FILE = "tvlars-index.arrow"
"""The index's file name in the tree's root when ``data.index`` does not say otherwise."""
FORMAT_VERSION = 1
METADATA_KEY = b"tvlars_index"
SCHEMA = pa.schema([("path", pa.large_binary()), ("label", pa.int64())])


@dataclass(frozen=True)
class SplitIndex:
    """One split's files: relative paths packed into ``blob`` (``uint8``) cut by ``offsets``."""

    blob: np.ndarray
    offsets: np.ndarray
    """``int64 [n + 1]``: path ``i`` is ``blob[offsets[i]:offsets[i + 1]]``."""
    labels: np.ndarray
    """``int64 [n]``"""

    def __len__(self) -> int:
        return len(self.labels)

    def relative_path(self, index: int) -> str:
        start, end = self.offsets[index], self.offsets[index + 1]
        return os.fsdecode(self.blob[start:end].tobytes())


@dataclass(frozen=True)
class FolderIndex:
    """A tree's two splits, its classes, what staleness is checked against, and a content hash."""

    root: str
    """The tree's real path when it was listed."""
    classes: tuple[str, ...]
    eval_split: str
    """The evaluation directory's name (one of :data:`EVAL_SPLITS`)."""
    train: SplitIndex
    test: SplitIndex
    mtimes: dict[str, int]
    """Relative directory -> ``st_mtime_ns`` read before it was listed."""
    digest: str
    """blake2b-128 of the classes, the paths and the labels (hex)."""


def pack_split(relative_paths: list[str], labels) -> SplitIndex:
    """Pack relative paths (and their labels) into a :class:`SplitIndex`; a simulation may call
    this with made-up entries (no file needed)."""
    encoded = [os.fsencode(p) for p in relative_paths]
    lengths = np.fromiter((len(p) for p in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return SplitIndex(blob, offsets, np.asarray(labels, dtype=np.int64))


def _digest(classes: tuple[str, ...], eval_split: str, splits: tuple[SplitIndex, ...]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([FORMAT_VERSION, list(classes), eval_split]).encode())
    for split in splits:
        for array in (split.offsets, split.blob, split.labels):
            h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


def make_index(
    root: str,
    classes: tuple[str, ...],
    eval_split: str,
    train: SplitIndex,
    test: SplitIndex,
    mtimes: dict[str, int],
) -> FolderIndex:
    """A :class:`FolderIndex` with its content hash computed."""
    digest = _digest(classes, eval_split, (train, test))
    return FolderIndex(root, tuple(classes), eval_split, train, test, dict(mtimes), digest)


def _mtime(path: str) -> int:
    return os.stat(path).st_mtime_ns


def _list_split(root: str, split: str, classes: list[str], mtimes: dict[str, int]) -> SplitIndex:
    """``root/split/<class>/<image>`` in sorted order; each directory's mtime read before listing."""
    split_dir = os.path.join(root, split)
    index = {name: label for label, name in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    mtimes[split] = _mtime(split_dir)
    for name in sorted(os.listdir(split_dir)):
        directory = os.path.join(split_dir, name)
        if not os.path.isdir(directory):
            continue
        if name not in index:
            raise DataError(f"class directory '{directory}' is not a class of the train split")
        mtimes[f"{split}/{name}"] = _mtime(directory)
        files = sorted(
            entry.name
            for entry in os.scandir(directory)
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        paths += [f"{name}/{file}" for file in files]
        labels += [index[name]] * len(files)
    if not paths:
        raise DataError(
            f"no image files under '{split_dir}' (expected {split_dir}/<class>/<image>)"
        )
    return pack_split(paths, labels)


def eval_split_of(root: str) -> str | None:
    """The first of :data:`EVAL_SPLITS` that is a directory of ``root`` (stats only)."""
    return next((n for n in EVAL_SPLITS if os.path.isdir(os.path.join(root, n))), None)


def scan_tree(name: str, root: str) -> FolderIndex:
    """List ``root/train/<class>/*`` and its evaluation split: the one full listing of the tree."""
    if not os.path.isdir(os.path.join(root, "train")):
        found = ", ".join(sorted(os.listdir(root))) or "nothing"
        raise DataError(f"{name}: '{root}' has no 'train' directory (found: {found})")
    eval_split = eval_split_of(root)
    if eval_split is None:
        raise DataError(
            f"{name}: '{root}' has no evaluation directory named {' / '.join(EVAL_SPLITS)}"
        )
    train_root = os.path.join(root, "train")
    classes = sorted(e.name for e in os.scandir(train_root) if e.is_dir())
    if not classes:
        raise DataError(f"{name}: '{train_root}' has no class directories")
    mtimes: dict[str, int] = {}
    train = _list_split(root, "train", classes, mtimes)
    test = _list_split(root, eval_split, classes, mtimes)
    return make_index(os.path.realpath(root), tuple(classes), eval_split, train, test, mtimes)


def _arrow_split(split: SplitIndex) -> pa.RecordBatch:
    paths = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(split), [None, pa.py_buffer(split.offsets), pa.py_buffer(split.blob)]
    )
    return pa.record_batch([paths, pa.array(split.labels)], schema=SCHEMA)


def write_index(index: FolderIndex, path: str) -> None:
    """Write ``index`` to ``path`` atomically (a temporary file in the same directory, renamed):
    a rank never maps a half-written index, and two jobs writing at once leave one whole file."""
    metadata = {
        "version": FORMAT_VERSION,
        "root": index.root,
        "classes": list(index.classes),
        "eval_split": index.eval_split,
        "mtimes": index.mtimes,
        "digest": index.digest,
    }
    schema = SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata).encode()})
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(
        dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as file, pa.ipc.new_file(file, schema) as writer:
            writer.write_batch(_arrow_split(index.train))
            writer.write_batch(_arrow_split(index.test))
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _mapped_split(batch: pa.RecordBatch) -> SplitIndex:
    """numpy views of one split's mapped buffers (the labels copied: 8 bytes a sample, and torch
    wants a writable array)."""
    paths = batch.column(0)
    _, offsets, data = paths.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int64)[paths.offset : paths.offset + len(paths) + 1]
    return SplitIndex(
        np.frombuffer(data, dtype=np.uint8), offsets, batch.column(1).to_numpy().copy()
    )


def read_index(path: str) -> FolderIndex:
    """Memory-map an index file; DataError if it is not one this version wrote."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(path, "r"))
        metadata = json.loads(reader.schema.metadata[METADATA_KEY])
        if metadata["version"] != FORMAT_VERSION or reader.num_record_batches != 2:
            raise ValueError(
                f"format version {metadata['version']}, this code reads {FORMAT_VERSION}"
            )
        train, test = (_mapped_split(reader.get_batch(i)) for i in range(2))
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException) as error:
        raise DataError(
            f"cannot read the dataset index '{path}' ({type(error).__name__}: {error})"
        ) from None
    return FolderIndex(
        metadata["root"],
        tuple(metadata["classes"]),
        metadata["eval_split"],
        train,
        test,
        metadata["mtimes"],
        metadata["digest"],
    )


def stale_reason(index: FolderIndex, root: str) -> str | None:
    """Why ``index`` no longer describes the tree at ``root`` (None: it does); stats only."""
    if os.path.realpath(root) != index.root:
        return f"it was built for '{index.root}'"
    if eval_split_of(root) != index.eval_split:
        return f"the evaluation directory is no longer '{index.eval_split}'"
    for relative, mtime in index.mtimes.items():
        try:
            if _mtime(os.path.join(root, relative)) != mtime:
                return f"'{relative}' changed since it was built"
        except FileNotFoundError:
            return f"'{relative}' is gone"
    return None


def default_index_path(root: str) -> str:
    return os.path.join(root, INDEX_FILE)


def open_or_build_index(name: str, root: str, path: str | None, say=print) -> FolderIndex:
    """The index of ``root`` read from ``path`` (default: in the root), listed and written anew
    when absent or stale (``say`` is told why, in one line); returns it memory-mapped."""
    path = path or default_index_path(root)
    reason = None
    if os.path.exists(path):
        try:
            index = read_index(path)
            reason = stale_reason(index, root)
        except DataError as error:
            reason = str(error)
        if reason is None:
            return index
    index = scan_tree(name, root)
    try:
        write_index(index, path)
    except OSError as error:
        raise DataError(
            f"{name}: cannot write the dataset index '{path}' ({type(error).__name__}: "
            f"{error}); set data.index to a writable file every rank can read, or run "
            f"tvlars-index {root} --out FILE ahead of the job"
        ) from None
    if reason is not None:
        say(f"dataset index {path} rebuilt: {reason}")
    return read_index(path)


def main(argv: list[str] | None = None) -> int:
    """``tvlars-index ROOT [--out FILE]``: list an image-folder tree once, ahead of the job."""
    parser = argparse.ArgumentParser(prog="tvlars-index", description=main.__doc__.splitlines()[0])
    parser.add_argument("root", help="image-folder tree: ROOT/train/<class>/*, ROOT/val/<class>/*")
    parser.add_argument(
        "--out", help=f"index file (default ROOT/{INDEX_FILE}); set data.index to it"
    )
    args = parser.parse_args(argv)
    out = args.out or default_index_path(args.root)
    try:
        if not os.path.isdir(args.root):
            raise DataError(f"no such directory '{args.root}'")
        index = scan_tree("index", args.root)
        write_index(index, out)
    except (DataError, OSError) as error:
        print(f"index error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {out}: {len(index.train):,} train / {len(index.test):,} {index.eval_split} images, "
        f"{len(index.classes):,} classes, digest {index.digest}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
