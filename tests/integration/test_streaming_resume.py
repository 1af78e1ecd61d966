"""End to end: ``accelerate launch`` with ZeRO-2 on two ranks trains a ResNet-18 (BatchNorm) on a generated 64 px
image-folder tree read through the streaming path (2 decode workers per rank), is SIGKILLed
mid-epoch, resumes with ``checkpoint.resume=auto`` and ends BITWISE equal to the uninterrupted run:
model, every rank's optimizer partition, random states and trainer state (loader position
included)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from launching import REPO_ROOT, accelerate_launcher, train_command, trainer_env
from PIL import Image
from test_resume import assert_same_checkpoint, checkpoint, steps

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.long]

# 64 training images, global batch 16 = 4 micro x 2 accumulation x 2 ranks: 4 steps per epoch.
NUM_CLASSES, PER_CLASS = 4, 16
EVERY = 3  # checkpoints at 3, 6 and the end (8): the kill after step 5 resumes mid-epoch 1


def make_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", PER_CLASS), ("val", 2)):
        for c in range(NUM_CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                # Class-dependent colour plus noise: a learnable, photo-like 64 px JPEG.
                base = np.full((64, 64, 3), 60 * c, dtype=np.int16)
                noise = rng.integers(-40, 40, (64, 64, 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)
    return root


STREAMED = {  # the streamed-ImageNet run of these tests (test_bt_streaming_resume and test_slurm too)
    "data": {
        "name": "imagenet",
        "storage": "stream",
        "image_size": 32,
        "crop_scale": [0.25, 1.0],
        "num_workers": 2,
    },
    # BatchNorm: its running statistics are per rank under ZeRO (no buffer broadcast as in DDP),
    # so the evaluation after the resume matches only if every rank gets its own back.
    "model": {"name": "resnet18"},
    "batch": {"global_batch_size": 16, "micro_batch_size": 4},
    "optim": {"name": "lars", "lr": 2.0, "weight_decay": 5.0e-5},
    "schedule": {"name": "poly", "warmup_epochs": 0.5, "power": 2.0},
    "task": {"name": "classification", "label_smoothing": 0.1},
}


def write_config(directory: Path, tree: Path, run_dir: Path, **sections: dict) -> Path:
    """STREAMED over ``tree`` into ``run_dir`` (2 epochs, checkpoints every EVERY steps), with
    ``sections`` replacing its sections."""
    config = {
        "run": {
            "output_dir": str(run_dir),
            "num_epochs": 2,
            "log_every": 1,
            "trackers": [],
            "progress_bar": False,
        },
        **STREAMED,
        **sections,
        "checkpoint": {"every_steps": EVERY, "keep_last": 100},
    }
    config["data"] = {**config["data"], "path": str(tree)}
    path = directory / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def accelerate(config: Path, *overrides: str, kill: str | None = None):
    env = {k: v for k, v in trainer_env().items() if not k.startswith("TVLARS_FAULT_")}
    if kill:
        env["TVLARS_FAULT_KILL"] = kill
    command = train_command(
        "--config",
        str(config),
        *overrides,
        launcher=accelerate_launcher("accelerate_zero2.yaml", "--num_processes", "2"),
    )
    return subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def killed_and_resumed(tmp_path: Path, **sections: dict) -> tuple[Path, Path, str]:
    """The uninterrupted reference run, then the same run SIGKILLed after step 5 and resumed with
    ``checkpoint.resume=auto``, both under ZeRO-2 x 2 (``sections`` as in :func:`write_config`);
    the checkpoints after the resume must equal the reference's bitwise. Returns the reference's
    and the resumed run's directories and the reference's stdout."""
    tree = make_tree(tmp_path / "tree")
    reference_dir, faulty_dir = tmp_path / "reference", tmp_path / "faulty"
    reference = accelerate(write_config(tmp_path, tree, reference_dir, **sections))
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    assert steps(reference_dir) == [3, 6, 8]

    config = write_config(tmp_path, tree, faulty_dir, **sections)
    killed = accelerate(config, kill="boundary:5")
    assert killed.returncode != 0 and steps(faulty_dir) == [3]
    resumed = accelerate(config, "checkpoint.resume=auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert steps(faulty_dir) == [3, 6, 8]
    for step in (6, 8):
        assert_same_checkpoint(checkpoint(faulty_dir, step), checkpoint(reference_dir, step))
    return reference_dir, faulty_dir, reference.stdout


def test_zero2_streaming_run_killed_and_resumed_matches_the_uninterrupted_run(tmp_path):
    _, faulty_dir, _ = killed_and_resumed(tmp_path)
    assert os.path.exists(faulty_dir / "metrics.json")
