"""tvlars-eval reproduces a run's final test accuracy exactly (export, run directory, two ranks);
a fine-tune from a Barlow Twins export with the shipped digits_finetune config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from launching import accelerate_launcher, launch, read_metrics, train_command

pytestmark = pytest.mark.slow  # ~40 s: three short trainings and three evaluations

# The quick start, shortened.
QUICK = ("--config", "configs/digits.yaml", "run.num_epochs=3", "run.trackers=[]")


def evaluate(*args: str, launcher: tuple[str, ...] = ()) -> dict:
    if launcher:
        command = [sys.executable, "-m", "accelerate.commands.launch", *launcher]
    else:
        command = [sys.executable]
    out = Path(args[args.index("--out") + 1])
    result = launch([*command, "-m", "tvlars_scale.evaluate", *args])
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    return printed


def test_eval_reproduces_the_quick_starts_final_test_accuracy(tmp_path):
    run_dir = tmp_path / "quick"
    launch(train_command(*QUICK, f"run.output_dir={run_dir}", "run.progress_bar=false"))
    final = read_metrics(run_dir)["history"][-1]

    exported = evaluate(str(run_dir / "export"), "--out", str(tmp_path / "export.json"))
    assert exported["kind"] == "export" and exported["num_samples"] == 360
    assert (exported["top1"], exported["test_loss"]) == (
        final["test_accuracy"],
        final["test_loss"],
    )
    assert exported["top1"] <= exported["top5"] <= 1 and exported["step"] == final["step"]

    # A run directory (its newest checkpoint), scored by two ranks: each sample counted once.
    launcher = accelerate_launcher("accelerate_node.yaml", "--num_processes", "2")
    two_ranks = evaluate(str(run_dir), "--out", str(tmp_path / "run.json"), launcher=launcher)
    assert two_ranks["kind"] == "checkpoint" and two_ranks["world_size"] == 2
    assert two_ranks["source"].endswith(f"checkpoints/step-{final['step']}")
    assert (two_ranks["num_samples"], two_ranks["top1"], two_ranks["top5"]) == (
        360,
        exported["top1"],
        exported["top5"],
    )


def test_fine_tune_from_a_barlow_twins_export(tmp_path):
    pretrained = tmp_path / "bt"
    launch(
        train_command(
            *QUICK,
            "run.num_epochs=1",
            f"run.output_dir={pretrained}",
            "task.name=barlow_twins",
            "task.projector_dims=[64,64]",
            "task.linear_eval_epochs=1",
        )
    )
    run_dir = tmp_path / "finetune"
    result = launch(
        train_command(
            "--config",
            "digits_finetune",
            f"model.init_from={pretrained / 'export'}",
            f"run.output_dir={run_dir}",
            "run.num_epochs=1",
            "run.trackers=[]",
        )
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("model.init_from")]
    assert lines == [
        f"model.init_from: export {pretrained / 'export'}: loaded 9 of the model's 11 tensors",
        "model.init_from: new head, freshly initialised: head.weight [10, 128] (source: absent), "
        "head.bias [10] (source: absent)",
    ]
    assert read_metrics(run_dir)["history"][-1]["epoch"] == 1  # it trained on from there
