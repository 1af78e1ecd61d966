"""Collect finished runs into a Table-1-shaped markdown, the paper's numbers beside ours.

    python -m tvlars_scale.paper.report runs/paper_table1 > table1.md
    python -m tvlars_scale.paper.report runs/digits_study --rows batch

A finished run is a directory holding the trainer's ``config.yaml`` (the resolved config) and
``metrics.json``; everything the table needs is read from those two files, so runs launched by hand
count as well as grid runs. One section per (task, dataset); one column per optimizer setting
(TVLARS, LARS with and without warm-up, LAMB ...); one row per (batch, lr) (``--rows lr``, the
paper's layout) or per batch (``--rows batch``, for studies whose optimizers use different learning
rates); a cell is the mean top-1 (%) over seeds +- their standard deviation and the seed count.
The best mean of a row is bold. The paper's values come from ``tvlars_scale/paper/table1.yaml``; a
cell it does not hold reads ``n/a``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

PAPER_TABLE = Path(__file__).with_name("table1.yaml")
PAPER_DATASETS = ("cifar10", "tiny-imagenet")
METRIC_BY_TASK = {"classification": "test_accuracy", "barlow_twins": "linear_test_accuracy"}
TASK_TITLES = {"classification": "Classification", "barlow_twins": "Barlow Twins (linear eval.)"}
# Our optimizer settings -> the paper's Table 1 column (its baselines use warm-up).
PAPER_COLUMN = {"TVLARS": "TVLARS", "LARS (warm-up)": "LARS", "LAMB (warm-up)": "LAMB"}
COLUMN_ORDER = (
    "TVLARS",
    "TVLARS (official)",
    "LARS (warm-up)",
    "LARS (no warm-up)",
    "LAMB (warm-up)",
    "LAMB",
    "SGD",
)


class ReportError(ValueError):
    """A missing directory or a malformed file; printed as one line, exit status 2."""


@dataclass(frozen=True)
class RunResult:
    task: str
    dataset: str
    model: str
    optimizer: str
    batch: int
    lr: float
    seed: int
    top1: float
    """Top-1 accuracy in [0, 1]."""


def _schedule_section(config: dict) -> dict:
    """The resolved ``schedule`` section; a run written before the schedule left the ``optim``
    section (``optim.schedule``, ``optim.warmup_epochs``) is read from its old keys, so a grid
    resumed across the change reports its earlier runs in the right column."""
    if "schedule" in config:
        return config["schedule"]
    optim = config["optim"]
    return {"name": optim.get("schedule"), "warmup_epochs": optim.get("warmup_epochs", 0)}


def optimizer_label(config: dict) -> str:
    """The table column of a run's resolved config (its ``optim`` and ``schedule`` sections)."""
    name = config["optim"]["name"]
    schedule = _schedule_section(config)
    warmup = schedule.get("name") == "warmup_cosine" and schedule.get("warmup_epochs", 0) > 0
    if name == "tvlars":
        return "TVLARS"
    if name == "tvlars_official":
        return "TVLARS (official)"
    if name in ("lars", "lamb"):
        return f"{name.upper()} ({'warm-up' if warmup else 'no warm-up'})".replace(
            "LAMB (no warm-up)", "LAMB"
        )
    return name.upper()


def read_run(run_dir: Path) -> RunResult:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    task = config["task"]["name"]
    metric = METRIC_BY_TASK.get(task, "test_accuracy")
    final = metrics.get("final", {})
    if metric not in final:
        raise ReportError(f"{run_dir}/metrics.json: final has no {metric!r}")
    return RunResult(
        task=task,
        dataset=config["data"]["name"],
        model=config["model"]["name"],
        optimizer=optimizer_label(config),
        batch=int(config["batch"]["global_batch_size"]),
        lr=float(config["optim"]["lr"]),
        seed=int(config["run"]["seed"]),
        top1=float(final[metric]),
    )


def collect_runs(root: Path) -> tuple[list[RunResult], list[Path]]:
    """Finished runs under ``root``, and the run directories that have not finished."""
    if not root.is_dir():
        raise ReportError(f"{root}: not a directory")
    finished, unfinished = [], []
    for config_path in sorted(root.rglob("config.yaml")):
        run_dir = config_path.parent
        if (run_dir / "metrics.json").exists():
            finished.append(read_run(run_dir))
        else:
            unfinished.append(run_dir)
    return finished, unfinished


def load_paper_table(path: Path = PAPER_TABLE) -> tuple[dict[tuple, float], str]:
    """``(task, dataset, batch, lr, paper column) -> top-1 %`` and the table's status line."""
    data = yaml.safe_load(path.read_text())
    values = {
        (r["task"], r["dataset"], int(r["batch"]), float(r["lr"]), r["optimizer"]): float(r["top1"])
        for r in data.get("results") or []
    }
    return values, str(data.get("status", ""))


def _cell(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f} ({len(values)})"


def _columns(results: list[RunResult]) -> list[str]:
    present = {r.optimizer for r in results}
    ordered = [c for c in COLUMN_ORDER if c in present]
    return ordered + sorted(present - set(ordered))


def _section_order(key: tuple[str, str, str]) -> tuple:
    """The paper's order: classification before Barlow Twins, CIFAR-10 before Tiny ImageNet."""
    task, dataset, model = key
    task_rank = list(TASK_TITLES).index(task) if task in TASK_TITLES else len(TASK_TITLES)
    data_rank = PAPER_DATASETS.index(dataset) if dataset in PAPER_DATASETS else len(PAPER_DATASETS)
    return task_rank, data_rank, dataset, model


def _render_section(
    key: tuple[str, str, str], section: list[RunResult], paper: dict[tuple, float], rows: str
) -> list[str]:
    task, dataset, model = key
    with_paper = rows == "lr" and dataset in PAPER_DATASETS
    columns = _columns(section)
    header = ["B"] + (["LR"] if rows == "lr" else [])
    for column in columns:
        header.append(f"{column} (ours)" if with_paper else column)
        if with_paper and column in PAPER_COLUMN:
            header.append(f"{column} (paper)")
    out = [f"### {TASK_TITLES.get(task, task)}: {dataset} / {model}", ""]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    # row -> optimizer column -> lr -> top-1 of each seed
    by_row = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in section:
        by_row[(r.batch, r.lr) if rows == "lr" else (r.batch,)][r.optimizer][r.lr].append(r.top1)
    for row, cells in sorted(by_row.items()):
        means = {c: max(statistics.fmean(v) for v in cells[c].values()) for c in cells}
        line = [str(row[0])] + ([f"{row[1]:g}"] if rows == "lr" else [])
        for column in columns:
            per_lr = cells.get(column, {})
            text = "; ".join(
                _cell(v) + ("" if rows == "lr" else f" @ lr {lr:g}")
                for lr, v in sorted(per_lr.items())
            )
            bold = per_lr and len(cells) > 1 and means[column] == max(means.values())
            line.append(f"**{text}**" if bold else (text or "—"))
            if with_paper and column in PAPER_COLUMN:
                paper_key = (task, dataset, row[0], row[1], PAPER_COLUMN[column])
                line.append(f"{paper[paper_key]:.2f}" if paper_key in paper else "n/a")
        out.append("| " + " | ".join(line) + " |")
    return [*out, ""]


def render(results: list[RunResult], paper: dict[tuple, float], rows: str = "lr") -> str:
    """The markdown tables, one section per (task, dataset, model)."""
    sections = defaultdict(list)
    for result in results:
        sections[(result.task, result.dataset, result.model)].append(result)
    out = []
    for key in sorted(sections, key=_section_order):
        out += _render_section(key, sections[key], paper, rows)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tvlars_scale.paper.report", description=__doc__
    )
    parser.add_argument("runs_dir", type=Path, help="directory holding finished run directories")
    parser.add_argument("--rows", choices=("lr", "batch"), default="lr")
    parser.add_argument("--paper", type=Path, default=PAPER_TABLE, help="paper values (YAML)")
    args = parser.parse_args(argv)
    try:
        results, unfinished = collect_runs(args.runs_dir)
        paper, status = load_paper_table(args.paper)
    except (ReportError, OSError, KeyError, ValueError, yaml.YAMLError) as error:
        print(f"report error: {error}", file=sys.stderr)
        return 2
    if not results:
        print(f"report error: {args.runs_dir}: no finished runs (config.yaml + metrics.json)",
              file=sys.stderr)  # fmt: skip
        return 2
    print(render(results, paper, args.rows))
    print(f"Top-1 accuracy (%) of {len(results)} finished runs; mean ± std over seeds (count).")
    if any(r.dataset in PAPER_DATASETS for r in results) and args.rows == "lr":
        print(f"Paper values: {args.paper.name}: {status or 'see file'}; n/a = not in the file.")
    if unfinished:
        print(f"Not finished (no metrics.json): {len(unfinished)} run(s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
