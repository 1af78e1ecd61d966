"""Count the directory entries a process lists: ``os.scandir`` and ``os.listdir`` (``os.walk`` and
pathlib list through them), the calls the data package reads a tree with.

``with count_listed_entries() as count: ...`` then ``count.entries`` (entries returned) and
``count.calls``. benchmarks/scale.py may count a simulated rank's start-up the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock


@dataclass
class ListingCount:
    calls: int = 0
    entries: int = 0


class _CountedScandir:
    """``os.scandir``'s iterator (also a context manager), counting the entries it yields."""

    def __init__(self, inner, count: ListingCount) -> None:
        self.inner, self.count = inner, count

    def __iter__(self):
        return self

    def __next__(self):
        entry = next(self.inner)
        self.count.entries += 1
        return entry

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.inner.close()

    def close(self) -> None:
        self.inner.close()


@contextmanager
def count_listed_entries() -> Iterator[ListingCount]:
    count = ListingCount()
    scandir, listdir = os.scandir, os.listdir

    def counted_scandir(*args, **kwargs):
        count.calls += 1
        return _CountedScandir(scandir(*args, **kwargs), count)

    def counted_listdir(*args, **kwargs):
        count.calls += 1
        names = listdir(*args, **kwargs)
        count.entries += len(names)
        return names

    with mock.patch("os.scandir", counted_scandir), mock.patch("os.listdir", counted_listdir):
        yield count


def follower_startup_entries(directory: str, num_entries: int, num_classes: int = 1000) -> int:
    """Directory entries a rank other than the first lists at start-up, for a simulated tree of
    ``num_entries`` training images: the index the first rank would write is written (made-up
    paths, no image files), then this process opens it as every other rank does. The other ranks'
    start-up holds no loop over ranks (one broadcast, one six-int all_reduce), so the count is the
    same at any world size."""
    from tvlars_scale.data.index import make_index, pack_split, write_index
    from tvlars_scale.data.streaming import open_prepared

    labels = [i % num_classes for i in range(num_entries)]
    train = pack_split([f"n{c:08d}/{i}.JPEG" for i, c in enumerate(labels)], labels)
    test = pack_split([f"n{c:08d}/val_{c}.JPEG" for c in range(num_classes)], range(num_classes))
    classes = tuple(f"n{c:08d}" for c in range(num_classes))
    root = os.path.join(directory, "tree")  # never created: the index alone is read
    path = os.path.join(directory, "index.arrow")
    write_index(make_index(root, classes, "val", train, test, {}), path)
    with count_listed_entries() as count:
        data = open_prepared("imagenet", root, 224, "folder", path)
    assert len(data.train) == num_entries
    return count.entries
