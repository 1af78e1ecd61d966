"""Collect finished runs into a Table-1-shaped markdown, the paper's numbers beside ours.

    python -m tvlars_scale.paper.report runs/paper_table1 > table1.md
    python -m tvlars_scale.paper.report runs/digits_study --rows batch

A finished run is a directory holding the trainer's ``config.yaml`` (the resolved config) and
``metrics.json``; everything the table needs is read from those two files, so runs launched by hand
count as well as grid runs. One section per (task, dataset); one column per optimizer setting
(TVLARS, LARS with and without warm-up, LAMB ...); one row per (batch, lr) (``--rows lr``, the
paper's layout) or per batch (``--rows batch``, for studies whose optimizers use different learning
rates); a cell is the mean top-1 (%) over seeds +- their standard deviation and the seed count.
The best mean of a row is bold.

For CIFAR-10 and Tiny ImageNet with ``--rows lr``, a section lists every cell of the paper's Table 1
for its (task, dataset), whether run or not: per paper column (TVLARS, LARS with warm-up, LAMB with
warm-up) the paper's value, ours and the difference (ours - paper, points of top-1 %); a cell with
no run reads ``no run``, and the report ends with the list of the paper's 216 cells that have no
run yet. The paper's values come from ``tvlars_scale/paper/table1.tsv`` (arXiv 2309.14053, Table 1).
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

PAPER_TABLE = Path(__file__).with_name("table1.tsv")
PAPER_HEADER = ["task", "dataset", "optimizer", "global_batch_size", "lr", "top1_percent"]
PAPER_DATASETS = ("cifar10", "tiny-imagenet")
METRIC_BY_TASK = {"classification": "test_accuracy", "barlow_twins": "linear_test_accuracy"}
TASK_TITLES = {"classification": "Classification", "barlow_twins": "Barlow Twins (linear eval.)"}
# Our optimizer settings -> the paper's Table 1 column, as table1.tsv names it (its baselines
# use warm-up).
PAPER_COLUMN = {"TVLARS": "tvlars", "LARS (warm-up)": "lars", "LAMB (warm-up)": "lamb"}
PaperKey = tuple[str, str, str, int, float]
"""(task, dataset, paper optimizer, global batch, target lr): one cell of Table 1."""
COLUMN_ORDER = (
    "TVLARS",
    "TVLARS (official)",
    "LARS (warm-up)",
    "LARS (no warm-up)",
    "LAMB (warm-up)",
    "LAMB",
    "SGD (Nesterov)",
    "SGD",
    "AdamW (warm-up)",
    "AdamW",
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
    if name == "sgd":
        return "SGD (Nesterov)" if config["optim"].get("nesterov") else "SGD"
    if name == "adamw":
        return "AdamW (warm-up)" if warmup else "AdamW"
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


def load_paper_table(path: Path = PAPER_TABLE) -> tuple[dict[PaperKey, float], str]:
    """Every cell of ``table1.tsv`` (``# ...`` lines are comments) and its ``# source:`` line."""
    lines = path.read_text().splitlines()
    body = [line for line in lines if line.strip() and not line.startswith("#")]
    if not body or body[0].split("\t") != PAPER_HEADER:
        raise ReportError(f"{path}: the first row must be the header {' '.join(PAPER_HEADER)}")
    values: dict[PaperKey, float] = {}
    for line in body[1:]:
        fields = line.split("\t")
        if len(fields) != len(PAPER_HEADER):
            raise ReportError(
                f"{path}: row {line!r}: expected {len(PAPER_HEADER)} tab-separated fields"
            )
        task, dataset, optimizer, batch, lr, top1 = fields
        key = (task, dataset, optimizer, int(batch), float(lr))
        if key in values:
            raise ReportError(f"{path}: row {line!r}: the cell appears twice")
        values[key] = float(top1)
    source = next((line.split("source:", 1)[1].strip() for line in lines
                   if line.startswith("#") and "source:" in line), "")  # fmt: skip
    return values, source


def paper_key(result: RunResult) -> PaperKey | None:
    """The Table-1 cell a run fills, or None (a dataset or optimizer setting the paper lacks)."""
    column = PAPER_COLUMN.get(result.optimizer)
    if column is None or result.dataset not in PAPER_DATASETS:
        return None
    return result.task, result.dataset, column, result.batch, result.lr


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


def _render_section(key: tuple[str, str, str], section: list[RunResult], rows: str) -> list[str]:
    """A section without paper values (other datasets, or one row per batch)."""
    task, dataset, model = key
    columns = _columns(section)
    header = ["B"] + (["LR"] if rows == "lr" else []) + columns
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
        out.append("| " + " | ".join(line) + " |")
    return [*out, ""]


def _render_paper_section(
    key: tuple[str, str, str], section: list[RunResult], paper: dict[PaperKey, float]
) -> list[str]:
    """Every Table-1 cell of the section's (task, dataset): paper, ours, ours - paper; then the
    columns the paper lacks (ours only), on the rows where they ran."""
    task, dataset, model = key
    extra = [c for c in _columns(section) if c not in PAPER_COLUMN]
    header = ["B", "LR"]
    for column in PAPER_COLUMN:
        header += [f"{column} (paper)", f"{column} (ours)", f"{column} (Δ)"]
    header += [f"{column} (ours)" for column in extra]
    out = [f"### {TASK_TITLES.get(task, task)}: {dataset} / {model}", ""]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    seeds = defaultdict(list)  # (column, batch, lr) -> top-1 of each seed
    for r in section:
        seeds[(r.optimizer, r.batch, r.lr)].append(r.top1)
    grid_rows = {(b, lr) for (t, d, _, b, lr) in paper if (t, d) == (task, dataset)}
    for batch, lr in sorted(grid_rows | {(r.batch, r.lr) for r in section}):
        means = {c: statistics.fmean(v) for (c, b, l), v in seeds.items() if (b, l) == (batch, lr)}
        best = max(means.values()) if len(means) > 1 else None
        line = [str(batch), f"{lr:g}"]
        for column in [*PAPER_COLUMN, *extra]:
            values = seeds.get((column, batch, lr))
            ours = _cell(values) if values else "no run"
            if values and means[column] == best:
                ours = f"**{ours}**"
            if column not in PAPER_COLUMN:
                line.append(ours if values else "—")
                continue
            value = paper.get((task, dataset, PAPER_COLUMN[column], batch, lr))
            delta = f"{100 * means[column] - value:+.2f}" if values and value is not None else ""
            line += [f"{value:.2f}" if value is not None else "—", ours, delta]
        out.append("| " + " | ".join(line) + " |")
    return [*out, ""]


def missing_cells(results: list[RunResult], paper: dict[PaperKey, float]) -> list[PaperKey]:
    """The paper's cells that no finished run fills, in the table's order."""
    have = {paper_key(r) for r in results}
    return [key for key in paper if key not in have]


def render_missing(missing: list[PaperKey], paper: dict[PaperKey, float]) -> list[str]:
    """One line per (task, dataset, paper column) with a cell that has no run yet."""
    if not missing:
        return [f"Every one of the paper's {len(paper)} cells has a finished run."]
    out = [f"No run yet for {len(missing)} of the paper's {len(paper)} cells:"]
    groups = defaultdict(list)
    for task, dataset, optimizer, batch, lr in missing:
        groups[(task, dataset, optimizer)].append((batch, lr))
    column_of = {value: key for key, value in PAPER_COLUMN.items()}
    columns = list(column_of)

    def order(group: tuple[str, str, str]) -> tuple:
        task, dataset, optimizer = group
        rank = columns.index(optimizer) if optimizer in columns else len(columns)
        return (*_section_order((task, dataset, "")), rank, optimizer)

    for (task, dataset, optimizer), cells in sorted(groups.items(), key=lambda g: order(g[0])):
        size = sum(1 for k in paper if k[:3] == (task, dataset, optimizer))
        if len(cells) == size:
            text = f"all {size}"
        else:
            by_batch = defaultdict(list)
            for batch, lr in cells:
                by_batch[batch].append(f"{lr:g}")
            text = "; ".join(f"B={b} lr {', '.join(lrs)}" for b, lrs in sorted(by_batch.items()))
        out.append(f"- {task} / {dataset} / {column_of.get(optimizer, optimizer)}: {text}")
    return out


def render(results: list[RunResult], paper: dict[PaperKey, float], rows: str = "lr") -> str:
    """The markdown tables, one section per (task, dataset, model); Table-1 sections (paper
    datasets, one row per (batch, lr)) hold every cell of the paper, run or not."""
    sections = defaultdict(list)
    for result in results:
        sections[(result.task, result.dataset, result.model)].append(result)
    out = []
    for key in sorted(sections, key=_section_order):
        if rows == "lr" and key[1] in PAPER_DATASETS:
            out += _render_paper_section(key, sections[key], paper)
        else:
            out += _render_section(key, sections[key], rows)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tvlars_scale.paper.report", description=__doc__
    )
    parser.add_argument("runs_dir", type=Path, help="directory holding finished run directories")
    parser.add_argument("--rows", choices=("lr", "batch"), default="lr")
    parser.add_argument("--paper", type=Path, default=PAPER_TABLE,
                        help="the paper's values (TSV, default: the package's table1.tsv)")  # fmt: skip
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
        print(f"Paper values: {status or args.paper.name}. Δ = ours - paper (points); "
              "no run = the cell has no finished run yet.\n")  # fmt: skip
        print("\n".join(render_missing(missing_cells(results, paper), paper)))
    if unfinished:
        print(f"Not finished (no metrics.json): {len(unfinished)} run(s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
