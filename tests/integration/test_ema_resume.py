"""run.ema through the trainer: a killed run resumes bitwise, its moving average included, and a
two-rank ZeRO-2 checkpoint with an average resumes on one process (the per-layer exactness of that
load: tests/distributed/test_ema_clip_ranks.py)."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from test_resume import (
    KILLED,
    SINGLE,
    ZERO2,
    assert_same_checkpoint,
    checkpoint,
    launch,
    steps,
    write_config,
)

from tvlars_scale.checkpoint.checkpointer import MODEL_EMA_FILE
from tvlars_scale.checkpoint.directory import load_file
from tvlars_scale.export import load_exported

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

EMA = {"ema": {"decay": 0.9, "warmup_steps": 4, "every_steps": 2}}


def test_a_killed_run_with_an_average_resumes_bitwise(tmp_path):
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "faulty"
    reference_config = write_config(tmp_path, reference_dir, run=EMA)
    config = write_config(tmp_path, run_dir, run=EMA)
    result = launch(reference_config, SINGLE)
    assert result.returncodes == [0], result.describe()
    metrics = json.loads((reference_dir / "metrics.json").read_text())
    assert {"test_accuracy", "ema_test_accuracy"} <= metrics["final"].keys()
    # The export ships the average beside the weights, loadable into the same model.
    export = reference_dir / "export"
    assert json.loads((export / "model.json").read_text())["ema_weights"] == "model_ema.safetensors"
    model = load_exported(export)
    averaged = safetensors.torch.load_file(str(export / "model_ema.safetensors"))
    model.load_state_dict(averaged, strict=True)
    saved = load_file(checkpoint(reference_dir, 22), MODEL_EMA_FILE)
    assert all(torch.equal(averaged[k], v) for k, v in saved.items())

    result = launch(config, SINGLE, faults={"TVLARS_FAULT_KILL": "boundary:10"})
    assert result.returncodes == [KILLED], result.describe()
    assert steps(run_dir) == [4, 8]
    result = launch(config, SINGLE, "checkpoint.resume=auto")
    assert result.returncodes == [0], result.describe()
    assert "no moving average" not in result.outputs[0]
    for step in (12, 16, 20, 22):
        assert_same_checkpoint(checkpoint(run_dir, step), checkpoint(reference_dir, step))
        assert_equal_files(run_dir, reference_dir, step)
    histories = [
        json.loads((d / "metrics.json").read_text())["history"] for d in (run_dir, reference_dir)
    ]
    assert histories[0] == histories[1]


def assert_equal_files(run_dir, reference_dir, step: int) -> None:
    from test_resume import assert_equal

    ours = load_file(checkpoint(run_dir, step), MODEL_EMA_FILE)
    theirs = load_file(checkpoint(reference_dir, step), MODEL_EMA_FILE)
    assert_equal(ours, theirs, f"step-{step}/{MODEL_EMA_FILE}")


@pytest.mark.long
def test_a_two_rank_zero2_average_resumes_on_one_process(tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, run_dir, run=EMA, data={"crop_padding": 0})
    result = launch(config, ZERO2, faults={"TVLARS_FAULT_KILL": "boundary:6"})
    assert result.returncodes == [KILLED] * 2, result.describe()
    assert steps(run_dir) == [4]
    result = launch(config, SINGLE, "checkpoint.resume=auto")
    assert result.returncodes == [0], result.describe()
    assert "resuming a 2-rank checkpoint on 1 rank" in result.outputs[0]
    assert "no moving average" not in result.outputs[0]
    assert "ema_test_accuracy" in json.loads((run_dir / "metrics.json").read_text())["final"]
