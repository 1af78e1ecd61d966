"""End to end: ``accelerate launch`` with ZeRO-2 on two ranks pretrains Barlow Twins on a generated
32 px image-folder tree read through the streaming path (two views per sample decoded in 2 workers
per rank; a plan of 4 + 3 micro batches, so the Gradient Cache spans two uneven micro batches), is
SIGKILLed mid-epoch, resumes with ``checkpoint.resume=auto`` and ends BITWISE equal to the
uninterrupted run: model (the projector's BatchNorm statistics included), every rank's optimizer
partition, random states and trainer state (loader position and linear-evaluation history)."""

from __future__ import annotations

import json

import pytest
from test_streaming_resume import killed_and_resumed

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.long]

# 64 training images, global batch 14 = 2 rounds of 7 (4 + 3 over the ranks): 4 steps per epoch;
# checkpoints every 3 steps (test_streaming_resume.EVERY): the kill after step 5 resumes mid-epoch 1.
BARLOW_TWINS = {
    "model": {"name": "digits_cnn"},
    "batch": {"global_batch_size": 14, "micro_batch_size": 4},
    "optim": {"name": "lars", "lr": 1.0, "weight_decay": 5.0e-5},
    "task": {"name": "barlow_twins", "projector_dims": [64, 64], "linear_eval_epochs": 5},
}


def test_zero2_streamed_barlow_twins_killed_and_resumed_matches_the_uninterrupted_run(tmp_path):
    reference_dir, faulty_dir, stdout = killed_and_resumed(tmp_path, **BARLOW_TWINS)
    assert "2 ranks x 2 accumulation x 3-4 micro" in stdout
    final = [
        json.loads((d / "metrics.json").read_text())["final"] for d in (faulty_dir, reference_dir)
    ]
    assert final[0] == final[1] and "linear_test_accuracy" in final[0]
