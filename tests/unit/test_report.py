"""The Table-1 report renders from a directory of fake finished runs written like the trainer's."""

import json
import statistics

import yaml

from tvlars_scale.config import load_config
from tvlars_scale.paper.report import main

BASE = "configs/digits.yaml"


def fake_run(root, name, overrides, final):
    """A run directory as the trainer leaves it: resolved config.yaml + metrics.json."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = load_config(BASE, overrides)
    (run_dir / "config.yaml").write_text(config.to_yaml())
    (run_dir / "metrics.json").write_text(json.dumps({"final": final, "history": [final]}))
    return run_dir


CIFAR = ["data.name=cifar10", "model.name=resnet18", "batch.global_batch_size=512"]
TVLARS = ["optim.name=tvlars"]
LARS_WARMUP = ["optim.name=lars", "schedule.name=warmup_cosine", "schedule.warmup_epochs=20"]
LARS_POLY = ["optim.name=lars", "schedule.name=poly"]


def row_of(markdown: str, prefix: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(prefix))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_report_renders_table_1_shape_with_seed_statistics(tmp_path, capsys):
    runs = tmp_path / "runs"
    tvlars_acc = [0.91, 0.93, 0.92]
    for seed, acc in enumerate(tvlars_acc):
        fake_run(runs, f"tv{seed}", [*CIFAR, *TVLARS, "optim.lr=2", f"run.seed={seed}"],
                 {"test_accuracy": acc})  # fmt: skip
    fake_run(runs, "lars", [*CIFAR, *LARS_WARMUP, "optim.lr=2"], {"test_accuracy": 0.88})
    fake_run(runs, "lars3", [*CIFAR, *LARS_WARMUP, "optim.lr=3"], {"test_accuracy": 0.95})
    fake_run(
        runs,
        "bt",
        [*CIFAR, *TVLARS, "optim.lr=2", "task.name=barlow_twins"],
        {"linear_test_accuracy": 0.7, "linear_train_accuracy": 0.8},
    )
    unfinished = runs / "crashed"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text(load_config(BASE, CIFAR).to_yaml())

    paper = tmp_path / "paper.yaml"
    paper.write_text(yaml.safe_dump({"status": "test values", "results": [
        {"task": "classification", "dataset": "cifar10", "batch": 512, "lr": 2,
         "optimizer": "LARS", "top1": 90.5},
    ]}))  # fmt: skip

    assert main([str(runs), "--paper", str(paper)]) == 0
    out = capsys.readouterr().out
    assert "### Classification: cifar10 / resnet18" in out
    assert "### Barlow Twins (linear eval.): cifar10 / resnet18" in out
    header = row_of(out, "| B | LR")
    assert header == [
        "B", "LR", "TVLARS (ours)", "TVLARS (paper)", "LARS (warm-up) (ours)",
        "LARS (warm-up) (paper)",
    ]  # fmt: skip
    mean, std = 100 * statistics.fmean(tvlars_acc), 100 * statistics.stdev(tvlars_acc)
    assert row_of(out, "| 512 | 2 |") == [
        "512", "2", f"**{mean:.2f} ± {std:.2f} (3)**", "n/a", "88.00", "90.50",
    ]  # fmt: skip
    assert row_of(out, "| 512 | 3 |") == ["512", "3", "—", "n/a", "95.00", "n/a"]
    assert "70.00" in out  # the Barlow Twins run reports its linear-evaluation accuracy
    assert "Not finished (no metrics.json): 1 run(s)." in out
    assert "6 finished runs" in out


def test_rows_by_batch_shows_each_optimizers_lr(tmp_path, capsys):
    runs = tmp_path / "runs"
    digits = ["batch.global_batch_size=512"]
    fake_run(runs, "a", [*digits, *LARS_POLY, "optim.lr=2"], {"test_accuracy": 0.9})
    fake_run(runs, "b", [*digits, "optim.name=lamb", "optim.lr=0.02"], {"test_accuracy": 0.95})
    assert main([str(runs), "--rows", "batch"]) == 0
    out = capsys.readouterr().out
    assert row_of(out, "| B |") == ["B", "LARS (no warm-up)", "LAMB"]  # no paper columns
    assert row_of(out, "| 512 |") == ["512", "90.00 @ lr 2", "**95.00 @ lr 0.02**"]


def test_run_written_before_the_schedule_section_keeps_its_column(tmp_path, capsys):
    """A grid resumed across the config change: an earlier run's config.yaml holds its schedule
    in the optim section (optim.schedule, optim.warmup_epochs) and still counts as warm-up."""
    runs = tmp_path / "runs"
    digits = ["batch.global_batch_size=512", "optim.lr=2"]
    fake_run(runs, "new", [*digits, *LARS_WARMUP, "run.seed=0"], {"test_accuracy": 0.9})
    old = fake_run(runs, "old", [*digits, *LARS_WARMUP, "run.seed=1"], {"test_accuracy": 0.8})
    config = yaml.safe_load((old / "config.yaml").read_text())
    schedule = config.pop("schedule")
    config["optim"].update(schedule=schedule["name"], warmup_epochs=schedule["warmup_epochs"])
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    assert main([str(runs), "--rows", "batch"]) == 0
    out = capsys.readouterr().out
    assert row_of(out, "| B |") == ["B", "LARS (warm-up)"]
    assert row_of(out, "| 512 |") == ["512", "85.00 ± 7.07 (2) @ lr 2"]


def test_empty_or_missing_directory_exits_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("report error:") for line in err)
