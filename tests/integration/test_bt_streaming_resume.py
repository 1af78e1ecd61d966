"""End to end: ``accelerate launch`` with ZeRO-2 on two ranks pretrains Barlow Twins on a generated
32 px image-folder tree read through the streaming path (two views per sample decoded in 2 workers
per rank; a plan of 4 + 3 micro batches, so the Gradient Cache spans two uneven micro batches), is
SIGKILLed mid-epoch, resumes with ``checkpoint.resume=auto`` and ends BITWISE equal to the
uninterrupted run: model (the projector's BatchNorm statistics included), every rank's optimizer
partition, random states and trainer state (loader position and linear-evaluation history)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_resume import assert_same_checkpoint, checkpoint, steps
from test_streaming_resume import accelerate, make_tree

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.long]

# 64 training images, global batch 14 = 2 rounds of 7 (4 + 3 over the ranks): 4 steps per epoch.
EVERY = 3  # checkpoints at 3, 6 and the end (8): the kill after step 5 resumes mid-epoch 1


def write_config(directory: Path, tree: Path, run_dir: Path) -> Path:
    config = {
        "run": {
            "output_dir": str(run_dir),
            "num_epochs": 2,
            "log_every": 1,
            "trackers": [],
            "progress_bar": False,
        },
        "data": {
            "name": "imagenet",
            "path": str(tree),
            "storage": "stream",
            "image_size": 32,
            "crop_scale": [0.25, 1.0],
            "num_workers": 2,
        },
        "model": {"name": "digits_cnn"},
        "batch": {"global_batch_size": 14, "micro_batch_size": 4},
        "optim": {"name": "lars", "lr": 1.0, "weight_decay": 5.0e-5},
        "schedule": {"name": "poly", "warmup_epochs": 0.5, "power": 2.0},
        "task": {"name": "barlow_twins", "projector_dims": [64, 64], "linear_eval_epochs": 5},
        "checkpoint": {"every_steps": EVERY, "keep_last": 100},
    }
    path = directory / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_zero2_streamed_barlow_twins_killed_and_resumed_matches_the_uninterrupted_run(tmp_path):
    tree = make_tree(tmp_path / "tree")
    reference_dir, faulty_dir = tmp_path / "reference", tmp_path / "faulty"
    reference = accelerate(write_config(tmp_path, tree, reference_dir))
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    assert "2 ranks x 2 accumulation x 3-4 micro" in reference.stdout
    assert steps(reference_dir) == [3, 6, 8]

    config = write_config(tmp_path, tree, faulty_dir)
    killed = accelerate(config, kill="boundary:5")
    assert killed.returncode != 0 and steps(faulty_dir) == [3]
    resumed = accelerate(config, "checkpoint.resume=auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert steps(faulty_dir) == [3, 6, 8]
    for step in (6, 8):
        assert_same_checkpoint(checkpoint(faulty_dir, step), checkpoint(reference_dir, step))
    final = [
        json.loads((d / "metrics.json").read_text())["final"] for d in (faulty_dir, reference_dir)
    ]
    assert final[0] == final[1] and "linear_test_accuracy" in final[0]
