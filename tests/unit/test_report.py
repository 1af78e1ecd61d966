"""The Table-1 report renders from a directory of fake finished runs written like the trainer's."""

import json
import statistics

import yaml

from tvlars_scale.config import load_config
from tvlars_scale.paper.report import load_paper_table, main

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


PAPER_HEADER = "task\tdataset\toptimizer\tglobal_batch_size\tlr\ttop1_percent"


def test_report_renders_table_1_shape_with_seed_statistics(tmp_path, capsys):
    runs = tmp_path / "runs"
    tvlars_acc = [0.91, 0.93, 0.92]
    for seed, acc in enumerate(tvlars_acc):
        fake_run(runs, f"tv{seed}", [*CIFAR, *TVLARS, "optim.lr=2", f"run.seed={seed}"],
                 {"test_accuracy": acc})  # fmt: skip
    fake_run(runs, "lars", [*CIFAR, *LARS_WARMUP, "optim.lr=2"], {"test_accuracy": 0.88})
    fake_run(runs, "lars3", [*CIFAR, *LARS_WARMUP, "optim.lr=3"], {"test_accuracy": 0.95})
    fake_run(runs, "adamw", [*CIFAR, "optim.name=adamw", "optim.lr=0.002",
                             "schedule.name=warmup_cosine", "schedule.warmup_epochs=5"],
             {"test_accuracy": 0.5})  # fmt: skip
    fake_run(
        runs,
        "bt",
        [*CIFAR, *TVLARS, "optim.lr=2", "task.name=barlow_twins"],
        {"linear_test_accuracy": 0.7, "linear_train_accuracy": 0.8},
    )
    unfinished = runs / "crashed"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text(load_config(BASE, CIFAR).to_yaml())

    paper = tmp_path / "paper.tsv"
    paper.write_text(
        "# source: test values\n"
        f"{PAPER_HEADER}\n"
        "classification\tcifar10\tlars\t512\t2\t90.5\n"
        "classification\tcifar10\ttvlars\t512\t1\t80.25\n"
        "barlow_twins\tcifar10\ttvlars\t512\t2\t60\n"
    )

    assert main([str(runs), "--paper", str(paper)]) == 0
    out = capsys.readouterr().out
    assert "### Classification: cifar10 / resnet18" in out
    assert "### Barlow Twins (linear eval.): cifar10 / resnet18" in out
    header = row_of(out, "| B | LR")
    assert header == [
        "B", "LR",
        "TVLARS (paper)", "TVLARS (ours)", "TVLARS (Δ)",
        "LARS (warm-up) (paper)", "LARS (warm-up) (ours)", "LARS (warm-up) (Δ)",
        "LAMB (warm-up) (paper)", "LAMB (warm-up) (ours)", "LAMB (warm-up) (Δ)",
        "AdamW (warm-up) (ours)",
    ]  # fmt: skip
    mean, std = 100 * statistics.fmean(tvlars_acc), 100 * statistics.stdev(tvlars_acc)
    # A cell the paper holds but no run fills reads "no run"; one we ran but the paper lacks "—".
    assert row_of(out, "| 512 | 1 |") == [
        "512", "1", "80.25", "no run", "", "—", "no run", "", "—", "no run", "", "—",
    ]  # fmt: skip
    assert row_of(out, "| 512 | 2 |") == [
        "512", "2", "—", f"**{mean:.2f} ± {std:.2f} (3)**", "", "90.50", "88.00",
        f"{88.0 - 90.5:+.2f}", "—", "no run", "", "—",
    ]  # fmt: skip
    assert row_of(out, "| 512 | 3 |")[2:8] == ["—", "no run", "", "—", "95.00", ""]
    assert row_of(out, "| 512 | 0.002 |")[-1] == "50.00"
    assert "70.00" in out and f"{70.0 - 60.0:+.2f}" in out  # Barlow Twins: linear eval. vs paper
    assert "Not finished (no metrics.json): 1 run(s)." in out
    assert "7 finished runs" in out
    assert "Paper values: test values." in out
    # Of the file's three cells, only (classification, TVLARS, 512, lr 1) has no run.
    assert "No run yet for 1 of the paper's 3 cells:" in out
    assert "- classification / cifar10 / TVLARS: all 1\n" in out


def test_report_shows_the_papers_table_1_beside_a_run(tmp_path, capsys):
    """The package's table1.tsv: CIFAR-10 / TVLARS / 16384 / lr 19 is 80.42 in the paper."""
    runs = tmp_path / "runs"
    fake_run(runs, "tv", ["data.name=cifar10", "model.name=resnet18",
                          "batch.global_batch_size=16384", *TVLARS, "optim.lr=19"],
             {"test_accuracy": 0.7731})  # fmt: skip
    assert main([str(runs)]) == 0
    out = capsys.readouterr().out
    row = row_of(out, "| 16384 | 19 |")
    assert row[2:5] == ["80.42", "77.31", f"{77.31 - 80.42:+.2f}"]
    assert row[5:8] == ["38.57", "no run", ""]  # LARS as printed in the paper
    # Every (batch, lr) of the paper's CIFAR-10 classification grid has a row: 6 x 3.
    section = out.split("### Classification: cifar10")[1].split("###")[0]
    assert sum(line.startswith("| ") for line in section.splitlines()) == 1 + 18  # + header
    assert "arXiv 2309.14053" in out
    assert "No run yet for 215 of the paper's 216 cells:" in out
    assert "- classification / cifar10 / TVLARS: " in out and "B=16384 lr 15, 17\n" in out
    assert "- barlow_twins / tiny-imagenet / LAMB (warm-up): all 18" in out


def test_paper_table_holds_216_distinct_cells_with_the_grids_shape():
    values, source = load_paper_table()
    assert len(values) == 216 and "2309.14053" in source
    assert values[("classification", "cifar10", "tvlars", 16384, 19.0)] == 80.42
    assert {k[:3] for k in values} == {
        (t, d, o) for t in ("classification", "barlow_twins")
        for d in ("cifar10", "tiny-imagenet") for o in ("tvlars", "lars", "lamb")
    }  # fmt: skip


def test_malformed_paper_table_exits_2(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs, "tv", [*CIFAR, *TVLARS, "optim.lr=2"], {"test_accuracy": 0.9})
    bad = tmp_path / "bad.tsv"
    for text in ("task\tdataset\n", f"{PAPER_HEADER}\nclassification\tcifar10\ttvlars\t512\n",
                 f"{PAPER_HEADER}\nclassification\tcifar10\ttvlars\t512\ttwo\t1\n"):  # fmt: skip
        bad.write_text(text)
        assert main([str(runs), "--paper", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("report error:") for line in err)


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
