"""Start-up on real gloo ranks: rank 0 alone lists an image-folder tree (once) and writes its index,
the others map it and list nothing; one collective refuses ranks that opened different data; an
error of the main process stops every rank with the same line; the main process loads a
``datasets`` source first."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from unittest import mock

import datasets
import pytest
import yaml
from listing import count_listed_entries
from multiproc import run_ranks
from PIL import Image

from tvlars_scale import build
from tvlars_scale.accelerate_setup import make_accelerator
from tvlars_scale.config import ConfigError, load_config
from tvlars_scale.data import hub
from tvlars_scale.data import index as index_module
from tvlars_scale.data.hub import open_splits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_streaming import make_tree

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _config(directory: str, path: str, index: str | None):
    data = {"name": "imagenet", "path": path, "image_size": 16, "num_workers": 0, "index": index}
    raw = {"run": {"output_dir": os.path.join(directory, "run"), "trackers": []}, "data": data}
    file = Path(directory) / f"rank{os.environ['RANK']}.yaml"
    file.write_text(yaml.safe_dump(raw))
    return load_config(file)


def start_up(directory: str, paths: list[str], index: str | None) -> dict:
    """``build.image_data`` as the trainer calls it; what this rank listed and built."""
    config = _config(directory, paths[int(os.environ["RANK"])], index)
    accelerator = make_accelerator(config)
    scans = mock.Mock(wraps=index_module.scan_tree)
    loads: list[tuple[float, float]] = []  # when this rank loaded a datasets source

    def timed_open_splits(*args):
        start = time.time()
        splits = open_splits(*args)
        loads.append((start, time.time()))
        return splits

    with (
        count_listed_entries() as count,
        mock.patch.object(index_module, "scan_tree", scans),
        mock.patch.object(hub, "open_splits", timed_open_splits),
    ):
        try:
            data = build.image_data(config, accelerator)
            outcome = (len(data.train), len(data.test), data.key)
        except ConfigError as error:
            outcome = error.line()
    return {"outcome": outcome, "entries": count.entries, "scans": scans.call_count, "loads": loads}


def scenarios(directory: str, tree: str, other: str, saved: str) -> dict:
    """Every case in one launch of the ranks (a spawn costs seconds of imports)."""
    return {
        "saved": start_up(directory, [saved, saved], None),
        "first": start_up(directory, [tree, tree], None),
        "again": start_up(directory, [tree, tree], None),
        "different": start_up(directory, [tree, other], None),
        "missing": start_up(directory, [directory + "/none", directory + "/none"], None),
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    directory = tmp_path_factory.mktemp("ranks")
    tree = make_tree(directory / "tree", num_classes=3, per_class=4)
    # Another copy with one image more, its own index written ahead (as on a node-local disk).
    other = make_tree(directory / "other", num_classes=3, per_class=4)
    (other / "train" / "n0000" / "extra.JPEG").write_bytes(
        (other / "train" / "n0000" / "img_0.JPEG").read_bytes()
    )
    assert index_module.main([str(other)]) == 0
    saved = directory / "saved"
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}
    )
    image = Image.new("RGB", (20, 20), (10, 20, 30))
    split = datasets.Dataset.from_dict(
        {"image": [image] * 6, "label": [0, 1] * 3}, features=features
    )
    datasets.DatasetDict({"train": split, "test": split.select(range(2))}).save_to_disk(str(saved))
    return run_ranks(
        scenarios, str(directory), str(tree), str(other), str(saved), collective_timeout_s=60
    )


def test_only_rank_0_lists_the_tree_and_only_once(ranks):
    first = [r["first"] for r in ranks]
    assert first[0]["outcome"] == first[1]["outcome"] and first[0]["outcome"][:2] == (12, 3)
    assert first[0]["scans"] == 1 and first[0]["entries"] >= 12 + 3
    assert first[1]["scans"] == 0 and first[1]["entries"] == 0
    # The next start-up (a requeue) finds the index fresh: no rank lists anything.
    again = [r["again"] for r in ranks]
    assert [(a["scans"], a["entries"]) for a in again] == [(0, 0), (0, 0)]
    assert again[0]["outcome"] == first[0]["outcome"]


def test_ranks_holding_different_data_are_refused_by_every_rank(ranks):
    lines = [r["different"]["outcome"] for r in ranks]
    assert lines[0] == lines[1], lines
    assert lines[0].startswith("config error: data.path: imagenet: the ranks opened different")
    assert "12..13 train" in lines[0] and "contents differ" in lines[0]


def test_an_error_of_the_main_process_is_every_ranks(ranks):
    lines = [r["missing"]["outcome"] for r in ranks]
    assert lines[0] == lines[1] and "no such directory" in lines[0], lines


def test_a_datasets_source_is_loaded_by_the_main_process_first(ranks):
    saved = [r["saved"] for r in ranks]
    assert saved[0]["outcome"] == saved[1]["outcome"] and saved[0]["outcome"][:2] == (6, 2)
    [(_, main_done)], [(other_start, _)] = saved[0]["loads"], saved[1]["loads"]
    assert main_done <= other_start  # the others read what the main process loaded
