"""An unreadable image under ``data.bad_images: error``, through the command line in a subprocess:
one line naming the file, exit status 4, the last checkpoint complete (resumable)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from launching import REPO_ROOT, train_command, trainer_env

from tvlars_scale.checkpoint import find_latest_complete
from tvlars_scale.data import EpochShards, open_streaming

sys.path.insert(0, str(REPO_ROOT / "tests" / "unit"))
from test_streaming import SIDE, make_tree

pytestmark = pytest.mark.slow

SEED, MICRO, GLOBAL = 7, 4, 8  # 32 images: 4 steps of 2 micro batches per epoch


def test_an_unreadable_image_is_one_line_exit_4_and_the_last_checkpoint_intact(tmp_path):
    tree = make_tree(tmp_path / "tree", num_classes=4, per_class=8)
    # The first sample of the third step of epoch 0 (steps 1 and 2 are checkpointed before it).
    order, _, bounds = EpochShards(32, MICRO, 0, 1, seed=SEED, grad_accum_steps=2).rank_order()
    victim = Path(open_streaming("imagenet", str(tree), SIDE).train.path(int(order[bounds[4]])))
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    run_dir = tmp_path / "run"
    config = {
        "run": {"output_dir": str(run_dir), "seed": SEED, "trackers": [], "progress_bar": False},
        "data": {"name": "imagenet", "path": str(tree), "image_size": SIDE, "num_workers": 1},
        "model": {"name": "digits_cnn"},
        "batch": {"global_batch_size": GLOBAL, "micro_batch_size": MICRO},
        "checkpoint": {"every_steps": 1},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        train_command("--config", str(tmp_path / "c.yaml")),
        cwd=REPO_ROOT,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 4, result.stdout[-2000:] + result.stderr[-3000:]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"data error: unreadable image {victim}: "), lines
    assert "data.bad_images=skip" in lines[0]
    latest = find_latest_complete(run_dir)
    assert latest is not None and latest.path.name == "step-2"
