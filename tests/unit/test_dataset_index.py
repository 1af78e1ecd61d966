"""The image-folder index: listed once, memory-mapped after, rebuilt when the tree changed, and the
``tvlars-index`` command that writes it ahead of a job."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from test_streaming import SIDE, make_tree

from tvlars_scale.data import DataError, open_streaming
from tvlars_scale.data import index as index_module
from tvlars_scale.data.index import INDEX_FILE, read_index, stale_reason
from tvlars_scale.data.streaming import open_prepared, prepare_streaming

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from listing import count_listed_entries, follower_startup_entries

PAST = 1_600_000_000  # a tree copied long ago: its directories' mtimes are old


def old_tree(root: Path, **sizes) -> Path:
    make_tree(root, **sizes)
    for directory in [p for p in root.rglob("*") if p.is_dir()]:
        os.utime(directory, (PAST, PAST))
    return root


def expected_files(root: Path, split: str) -> tuple[list[str], list[int]]:
    classes = sorted(p.name for p in (root / "train").iterdir())
    files = sorted((root / split).glob("*/*.JPEG"), key=lambda p: (p.parent.name, p.name))
    return [str(p) for p in files], [classes.index(p.parent.name) for p in files]


def test_the_tree_is_listed_once_then_mapped_without_listing(tmp_path):
    root = old_tree(tmp_path / "tree", num_classes=3, per_class=4, val_per_class=2)
    with count_listed_entries() as first:
        data = open_streaming("imagenet", str(root), SIDE)
    assert first.entries >= 3 * 4 + 3 * 2  # every file was listed
    assert (root / INDEX_FILE).is_file()
    for source, split in ((data.train, "train"), (data.test, "val")):
        paths, labels = expected_files(root, split)
        assert [source.path(i) for i in range(len(source))] == paths
        assert source.labels.tolist() == labels
    with count_listed_entries() as second:
        again = open_streaming("imagenet", str(root), SIDE)
    assert (second.calls, second.entries) == (0, 0)  # the index is fresh: stats only
    assert again.key == data.key and again.num_classes == 3
    assert [again.train.path(i) for i in range(12)] == [data.train.path(i) for i in range(12)]


def test_a_changed_tree_makes_the_index_stale_and_it_is_rebuilt_with_one_line(tmp_path):
    root = old_tree(tmp_path / "tree", num_classes=3, per_class=4)
    said: list[str] = []

    def prepare(**kwargs):
        return prepare_streaming("imagenet", str(root), say=said.append, **kwargs)

    assert prepare() == "folder" and said == []  # the first build is not a rebuild
    path = str(root / INDEX_FILE)
    built = read_index(path)
    assert stale_reason(built, str(root)) is None
    # A file rewritten in place keeps its name: the index still holds.
    victim = root / "train" / "n0001" / "img_0.JPEG"
    victim.write_bytes(victim.read_bytes())
    assert stale_reason(built, str(root)) is None
    # A file added to a class directory: stale, rebuilt (once), one line saying why.
    (root / "train" / "n0001" / "added.JPEG").write_bytes(victim.read_bytes())
    assert stale_reason(built, str(root)) == "'train/n0001' changed since it was built"
    with count_listed_entries() as rebuild:
        prepare()
    assert rebuild.entries > 0
    assert len(said) == 1 and "rebuilt" in said[0] and "train/n0001" in said[0], said
    assert len(open_prepared("imagenet", str(root), SIDE, "folder").train) == 13
    # A class directory removed, an evaluation directory renamed: stale as well.
    rebuilt = read_index(path)
    for file in (root / "val" / "n0002").iterdir():
        file.unlink()
    (root / "val" / "n0002").rmdir()
    assert stale_reason(rebuilt, str(root)) == "'val' changed since it was built"
    (root / "val").rename(root / "validation")
    assert "evaluation directory" in stale_reason(rebuilt, str(root))
    # One index file named for two trees (data.index): built for the other one.
    other = old_tree(tmp_path / "other", num_classes=2, per_class=2)
    shared = str(tmp_path / "shared.arrow")
    prepare(index=shared)
    assert "built for" in stale_reason(read_index(shared), str(other))
    # An index that is not one: rebuilt; one that cannot be written: one line naming it.
    Path(path).write_bytes(b"not an index")
    said.clear()
    prepare()
    assert len(said) == 1 and "cannot read the dataset index" in said[0]
    with pytest.raises(DataError, match=r"cannot write the dataset index '.*/missing/i\.arrow'"):
        prepare(index=str(tmp_path / "missing" / "i.arrow"))


def test_tvlars_index_writes_the_index_ahead_of_the_job(tmp_path, capsys):
    root = old_tree(tmp_path / "tree", num_classes=2, per_class=3)
    out = tmp_path / "elsewhere.arrow"
    assert index_module.main([str(root), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: 6 train / 2 val images, 2 classes")
    with count_listed_entries() as start:
        data = open_streaming("imagenet", str(root), SIDE, index=str(out))
    assert start.entries == 0 and len(data.train) == 6
    assert not (root / INDEX_FILE).exists()
    assert index_module.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("index error: no such directory"), err


def test_another_rank_lists_nothing_whatever_the_index_size(tmp_path):
    # What benchmarks/scale.py counts at 1,281,167 entries; a smaller simulated tree here.
    assert follower_startup_entries(str(tmp_path), 20_000, num_classes=100) == 0
