"""The in-process study: runs a tiny grid with sharpness, then its table, CSV/JSON and plot."""

import csv
import json
import math
from pathlib import Path

import pytest

from tvlars_scale.paper import study
from tvlars_scale.paper.study import aggregate, best_lrs, coverage, edge, edge_extensions, main

REPO = Path(__file__).resolve().parents[2]


def row(task, optimizer, batch, lr, seed, top1, sharpness=None):
    return dict(task=task, optimizer=optimizer, batch=batch, lr=lr, seed=seed, top1=top1,
                sharpness=sharpness)  # fmt: skip


def test_best_lr_is_chosen_on_seed_0_and_partial_seeds_name_the_cells_they_miss():
    rows = [
        row("classification", "lars", 128, 1.0, 0, 90.0, 10.0),
        row("classification", "lars", 128, 2.0, 0, 92.0, 20.0),
        row("classification", "lars", 256, 1.0, 0, 80.0),
        row("classification", "lars", 256, 2.0, 0, 80.0),  # a tie: the smaller LR
        row("classification", "lars", 256, 0.5, 0, 70.0),  # an edge extension
        # seed 1 ran each best LR; seed 2 stopped half-way: its cell averages 3 seeds, the
        # other 2, and the coverage line names the cell it has not reached.
        row("classification", "lars", 128, 2.0, 1, 94.0),
        row("classification", "lars", 256, 1.0, 1, 70.0),
        row("classification", "lars", 128, 2.0, 2, 50.0),
    ]
    assert best_lrs(rows) == {("classification", "lars", 128): 2.0,
                              ("classification", "lars", 256): 1.0}  # fmt: skip
    grid = {("classification", "lars", b, lr) for b in (128, 256) for lr in (1.0, 2.0)}
    assert coverage(rows, grid) == [
        "- Classification, seed 0: all 4 cells (every target LR), and 1 edge extensions",
        "- Classification, seed 1: the best LR of each of the 2 (optimizer, batch)",
        "- Classification, seed 2: the best LR of 1 of the 2 (optimizer, batch); not yet: lars/256",
    ]
    cells = {(c["batch"], c["lr"]): c for c in aggregate(rows)}
    assert cells[(128, 2.0)]["best_lr"] and not cells[(128, 1.0)]["best_lr"]
    assert cells[(128, 2.0)]["top1_mean"] == 78.667 and cells[(128, 2.0)]["seeds"] == 3
    assert cells[(128, 2.0)]["top1_std"] == pytest.approx(24.85, abs=1e-2)
    assert cells[(256, 1.0)]["seeds"] == 2 and cells[(256, 1.0)]["edge"] is None
    assert cells[(128, 2.0)]["edge"] == "high"
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
    assert "| tvlars | 1024 |" in table and "| adamw | 1024 | 0.01 * (one LR) |" in table
    assert "- Classification, seed 0: all 3 cells (every target LR)" in table
    with open(out / "table.csv") as handle:
        cells = list(csv.DictReader(handle))
    assert len(cells) == 3 and {c["optimizer"] for c in cells} == {"tvlars", "adamw"}
    assert (out / "accuracy_vs_batch.png").stat().st_size > 0
    assert len(json.loads((out / "table.json").read_text())) == 3


def test_edge_extensions_step_outward_by_the_cells_ratio_until_bracketed_or_capped():
    grid = [1.0, 2.0, 3.0]
    cells = {name: ("classification", name, 512) for name in "ABCDEF"}

    def sweep(name, top1_by_lr):
        return [row("classification", name, 512, lr, 0, top1) for lr, top1 in top1_by_lr.items()]

    rows = [
        *sweep("A", {1.0: 1, 2.0: 2, 3.0: 3}),
        *sweep("B", {1.0: 3, 2.0: 2, 3.0: 1}),
        *sweep("C", {1.0: 1, 2.0: 3, 3.0: 2}),
        # D: extended twice upward (4.5, 6.75), still best at the top: the cap of 2 is reached.
        *sweep("D", {lr: lr for lr in (*grid, 4.5, 6.75)}),
        # E: the grid's LR 3 has not finished: no edge to judge yet.
        *sweep("E", {1.0: 2, 2.0: 1}),
        # F: extended once downward (0.5) and 0.5 is still the best: one more step down.
        *sweep("F", {lr: 10 - lr for lr in (0.5, *grid)}),
        row("classification", "B", 512, 2.0, 1, 99.0),  # seed 1 never moves seed 0's choice
    ]
    grid_lrs = {cell: grid for cell in cells.values()}
    todo, capped = edge_extensions(rows, grid_lrs, max_extensions=2)
    assert todo == {cells["A"]: 4.5, cells["B"]: 0.5, cells["F"]: 0.25}
    assert capped == [cells["D"]]
    # The ratio is the cell's own, rounded to three significant digits: 5.66^2 / 11.3 = 2.835.
    wide = [row("classification", "G", 16384, lr, 0, 20 - lr) for lr in (5.66, 11.3, 17.0)]
    assert edge_extensions(wide, {("classification", "G", 16384): [5.66, 11.3, 17.0]}, 1) == (
        {("classification", "G", 16384): 2.84},
        [],
    )
    assert [edge([1.0, 2.0], b) for b in (1.0, 2.0)] == ["low", "high"]
    assert edge([1.0, 2.0, 3.0], 2.0) is None and edge([2.0], 2.0) == "single"


def _fake_run_one(peaks):
    """A stand-in for training: top-1 falls with |log(lr / peak)|, the peak per optimizer; writes
    what :func:`collect` reads."""

    def run_one(run, output_dir, extra, sharpness):
        labels = run.labels
        output_dir.mkdir(parents=True, exist_ok=True)
        config = {"task": {"name": labels["task"]}, "optim": {"lr": float(labels["lr"])},
                  "batch": {"global_batch_size": int(labels["batch"])},
                  "run": {"seed": int(labels["seed"])}}  # fmt: skip
        (output_dir / "config.yaml").write_text(json.dumps(config))
        (output_dir / "labels.json").write_text(json.dumps(labels))
        top1 = 0.9 - 0.1 * abs(math.log(float(labels["lr"]) / peaks[labels["optimizer"]]))
        metrics = {"final": {"test_accuracy": top1}}
        (output_dir / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    return run_one


def test_run_extend_edges_then_best_lr_only_follow_the_moved_best(tmp_path, monkeypatch, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"""
name: tiny
output_root: {tmp_path / "runs"}
seeds: [0, 1, 2]
datasets: {{digits: {{config: {REPO / "configs" / "digits.yaml"}}}}}
tasks: {{classification: {{overrides: {{task.name: classification}}}}}}
batch_lrs: {{64: [1, 2, 3]}}
optimizers: {{inside: {{overrides: {{optim.name: lars}}}}, above: {{overrides: {{optim.name: lars}}}},
             far: {{overrides: {{optim.name: lars}}}}}}
"""
    )
    # inside: peak at 2 (no extension); above: peak at 5 (3 -> 4.5 -> 6.75, where 4.5 is inside);
    # far: peak at 100 (4.5, 6.75, then the cap of 2).
    monkeypatch.setattr(study, "run_one", _fake_run_one({"inside": 2, "above": 5, "far": 100}))
    assert main(["run", "--grid", str(grid), "--extend-edges", "2"]) == 0
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    lrs = {opt: sorted(float(n.split("-lr")[1].split("-")[0]) for n in names if f"-{opt}-" in n)
           for opt in ("inside", "above", "far")}  # fmt: skip
    assert lrs == {"inside": [1, 2, 3], "above": [1, 2, 3, 4.5, 6.75], "far": [1, 2, 3, 4.5, 6.75]}
    assert all(n.endswith("-s0") for n in names)
    # Seeds 1-2 at each cell's best LR, an extension's included, cell by cell (a study stopped
    # part-way has whole cells); the run's overrides carry its LR.
    capsys.readouterr()
    assert main(["run", "--grid", str(grid), "--best-lr-only", "--seeds", "1", "2"]) == 0
    trained = [line.split()[1].rstrip(":") for line in capsys.readouterr().out.splitlines()]
    assert trained == [
        f"digits-classification-{cell}-s{seed}"
        for cell in ("inside-b64-lr2", "above-b64-lr4.5", "far-b64-lr6.75")
        for seed in (1, 2)
    ]
    run = study.run_at(study.load_grid(grid), {**(study.load_grid(grid).runs()[0].labels)}, 6.75)
    assert "optim.lr=6.75" in run.overrides and run.name.endswith("-lr6.75-s0")
    out = tmp_path / "results"
    assert main(["summarize", str(tmp_path / "runs"), "--grid", str(grid), "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert "best of 3 to 5 target LRs per cell" in table
    assert "| far | 64 | 6.75 * (edge ↑) |" in table and "| above | 64 | 4.5 * |" in table
    assert "- Classification, seed 2: the best LR of each of the 3 (optimizer, batch)" in table
    assert "seed 0: all 9 cells (every target LR), and 4 edge extensions" in table
    # --extend-edges chooses on seed 0 only.
    assert main(["run", "--grid", str(grid), "--extend-edges", "2", "--seeds", "1"]) == 2
