"""The in-process study: runs a tiny grid with sharpness, then its table, CSV/JSON and plot."""

import csv
import json
import math
from pathlib import Path

import pytest

from tvlars_scale.paper.study import aggregate, best_lrs, coverage, main

REPO = Path(__file__).resolve().parents[2]


def row(task, optimizer, batch, lr, seed, top1, sharpness=None):
    return dict(task=task, optimizer=optimizer, batch=batch, lr=lr, seed=seed, top1=top1,
                sharpness=sharpness)  # fmt: skip


def test_best_lr_is_chosen_on_seed_0_and_partial_seeds_are_dropped():
    rows = [
        row("classification", "lars", 128, 1.0, 0, 90.0, 10.0),
        row("classification", "lars", 128, 2.0, 0, 92.0, 20.0),
        row("classification", "lars", 256, 1.0, 0, 80.0),
        row("classification", "lars", 256, 2.0, 0, 80.0),  # a tie: the smaller LR
        # seed 1 ran each best LR: kept; seed 2 stopped half-way: dropped.
        row("classification", "lars", 128, 2.0, 1, 94.0),
        row("classification", "lars", 256, 1.0, 1, 70.0),
        row("classification", "lars", 128, 2.0, 2, 50.0),
    ]
    assert best_lrs(rows) == {("classification", "lars", 128): 2.0,
                              ("classification", "lars", 256): 1.0}  # fmt: skip
    grid = {("classification", "lars", b, lr) for b in (128, 256) for lr in (1.0, 2.0)}
    kept, lines = coverage(rows, grid)
    assert [r["seed"] for r in kept] == [0, 0, 0, 0, 1, 1]
    assert lines == [
        "- Classification, seed 0: all 4 cells (every target LR)",
        "- Classification, seed 1: the best LR of each of the 2 (optimizer, batch)",
        "- Classification, seed 2: 1 runs, not every best-LR cell: dropped",
    ]
    cells = {(c["batch"], c["lr"]): c for c in aggregate(kept)}
    assert cells[(128, 2.0)]["best_lr"] and not cells[(128, 1.0)]["best_lr"]
    assert cells[(128, 2.0)]["top1_mean"] == 93.0 and cells[(128, 2.0)]["seeds"] == 2
    assert cells[(128, 2.0)]["top1_std"] == pytest.approx(math.sqrt(2.0), abs=1e-3)
    assert (
        cells[(128, 2.0)]["sharpness_mean"] == 20.0 and cells[(256, 2.0)]["sharpness_mean"] is None
    )


def test_study_runs_a_grid_in_process_with_sharpness_and_summarizes(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"""
name: tiny
output_root: {tmp_path / "runs"}
seeds: [0]
common: {{run.num_epochs: 1, run.eval_every: 1, run.progress_bar: false, run.trackers: [],
          model.name: digits_cnn_small, run.log_every: 1000}}
datasets:
  digits: {{config: {REPO / "configs" / "digits.yaml"}}}
tasks:
  classification: {{overrides: {{task.name: classification}}}}
batch_lrs: {{1024: [1, 2]}}
optimizers:
  tvlars: {{overrides: {{optim.name: tvlars, schedule.name: constant, optim.delay_epochs: 0}}}}
  adamw: {{overrides: {{optim.name: adamw}}, batch_lrs: {{1024: [0.01]}}}}
"""
    )
    argv = ["run", "--grid", str(grid), "--sharpness-samples", "64", "--sharpness-iterations", "3"]
    assert main(argv) == 0
    run_dir = tmp_path / "runs" / "digits-classification-tvlars-b1024-lr2-s0"
    sharp = json.loads((run_dir / "sharpness.json").read_text())
    assert sharp["samples"] == 64 and 1 <= sharp["iterations"] <= 3
    assert math.isfinite(sharp["top_eigenvalue"]) and sharp["top_eigenvalue"] > 0
    assert json.loads((run_dir / "labels.json").read_text())["optimizer"] == "tvlars"
    assert "micro_batch_size: 1024" in (run_dir / "config.yaml").read_text()
    assert main(argv) == 0  # finished runs are skipped
    assert capsys.readouterr().out.count("top-1") == 3

    out = tmp_path / "results"
    assert main(["summarize", str(tmp_path / "runs"), "--grid", str(grid), "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert "| tvlars | 1024 |" in table and "| adamw | 1024 | 0.01 * |" in table
    assert "- Classification, seed 0: all 3 cells (every target LR)" in table
    with open(out / "table.csv") as handle:
        cells = list(csv.DictReader(handle))
    assert len(cells) == 3 and {c["optimizer"] for c in cells} == {"tvlars", "adamw"}
    assert (out / "accuracy_vs_batch.png").stat().st_size > 0
    assert len(json.loads((out / "table.json").read_text())) == 3
