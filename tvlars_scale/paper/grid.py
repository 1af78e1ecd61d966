"""Run grids: a small YAML description expanded into runs, printed or run as launch lines.

The paper's Table 1 (216 runs) is ``configs/paper_grid.yaml``; the CPU study on digits is
``configs/digits_study.yaml``::

    python -m tvlars_scale.paper.grid print                          # every launch line
    python -m tvlars_scale.paper.grid print --filter dataset=cifar10 --filter batch=512
    python -m tvlars_scale.paper.grid run --grid configs/digits_study.yaml   # one after another
    python -m tvlars_scale.paper.report runs/paper_table1            # the Table-1 markdown

A grid is the product of its axes: ``datasets`` x ``tasks`` x ``optimizers`` x (batch, lr) x
``seeds``. Every axis value carries dotted config overrides (``tvlars_scale.config``); an optimizer
may add overrides for one task (``per_task``: TVLARS' lambda is 1e-4 for classification and 1e-5
for Barlow Twins) and may replace the grid's ``batch_lrs`` with its own (LAMB's learning rates live
on another scale than LARS'). Each run's launch line is::

    LAUNCHER -m tvlars_scale.train --config DATASET_CONFIG key=value ... run.output_dir=ROOT/NAME

``run`` skips runs whose directory already holds a ``metrics.json`` (finished) and starts unfinished
ones over, so an interrupted grid is resumed by running the same command again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_GRID = "configs/paper_grid.yaml"
FILTER_KEYS = ("dataset", "task", "optimizer", "batch", "lr", "seed")


class GridError(ValueError):
    """A mistake in a grid file or the command line; printed as one line, exit status 2."""


@dataclass(frozen=True)
class Run:
    name: str
    config: str
    overrides: tuple[str, ...]
    labels: dict[str, str] = field(compare=False)

    def command(self, launcher: str, extra: tuple[str, ...] = ()) -> list[str]:
        return [
            *shlex.split(launcher),
            "-m",
            "tvlars_scale.train",
            "--config",
            self.config,
            *self.overrides,
            *extra,
        ]

    @property
    def output_dir(self) -> Path:
        return Path(self.labels["output_dir"])


def _format_value(value: Any) -> str:
    """A value as the YAML text that the config parser reads back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def format_number(value: float) -> str:
    """``2.0 -> 2``, ``0.0001 -> 0.0001``: the label used in run names and filters."""
    return f"{value:g}"


def _mapping(raw: Any, where: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise GridError(f"{where}: expected a mapping, got {type(raw).__name__}")
    return raw


def _overrides(raw: Any, where: str) -> dict[str, Any]:
    overrides = _mapping(raw, where)
    for key in overrides:
        if not isinstance(key, str) or "." not in key:
            raise GridError(f"{where}: {key!r} is not a dotted config key (e.g. optim.lr)")
    return overrides


def _batch_lrs(raw: Any, where: str) -> dict[int, list[float]]:
    table = _mapping(raw, where)
    if not table:
        raise GridError(f"{where}: needs at least one batch size")
    parsed = {}
    for batch, lrs in table.items():
        if not isinstance(batch, int) or batch < 1:
            raise GridError(f"{where}: batch size {batch!r} is not a positive integer")
        if not isinstance(lrs, list) or not lrs:
            raise GridError(f"{where}.{batch}: expected a non-empty list of learning rates")
        if not all(isinstance(lr, (int, float)) and lr > 0 for lr in lrs):
            raise GridError(f"{where}.{batch}: learning rates must be positive numbers")
        parsed[batch] = [float(lr) for lr in lrs]
    return parsed


@dataclass(frozen=True)
class Grid:
    name: str
    launcher: str
    output_root: str
    seeds: list[int]
    datasets: dict[str, dict]
    tasks: dict[str, dict]
    optimizers: dict[str, dict]
    batch_lrs: dict[int, list[float]]
    common: dict[str, Any]

    def runs(self) -> list[Run]:
        """Every run of the grid, in a stable order (dataset, task, optimizer, batch, lr, seed)."""
        runs = []
        for (dataset, dataset_spec), (task, task_spec), (opt, opt_spec) in itertools.product(
            self.datasets.items(), self.tasks.items(), self.optimizers.items()
        ):
            batch_lrs = opt_spec["batch_lrs"] or self.batch_lrs
            for batch, lrs in batch_lrs.items():
                for lr, seed in itertools.product(lrs, self.seeds):
                    name = f"{dataset}-{task}-{opt}-b{batch}-lr{format_number(lr)}-s{seed}"
                    output_dir = f"{self.output_root}/{name}"
                    overrides = {
                        **self.common,
                        **dataset_spec["overrides"],
                        **task_spec["overrides"],
                        **opt_spec["overrides"],
                        **opt_spec["per_task"].get(task, {}),
                        "batch.global_batch_size": batch,
                        "optim.lr": lr,
                        "run.seed": seed,
                        "run.output_dir": output_dir,
                    }
                    labels = {
                        "dataset": dataset,
                        "task": task,
                        "optimizer": opt,
                        "batch": str(batch),
                        "lr": format_number(lr),
                        "seed": str(seed),
                        "output_dir": output_dir,
                    }
                    runs.append(
                        Run(
                            name=name,
                            config=dataset_spec["config"],
                            overrides=tuple(
                                f"{k}={_format_value(v)}" for k, v in overrides.items()
                            ),
                            labels=labels,
                        )
                    )
        return runs


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise GridError(f"--grid: cannot read {str(path)!r}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise GridError(f"{path}: malformed YAML: {str(error).splitlines()[0]}") from None
    raw = _mapping(raw, str(path))
    known = {
        "name", "launcher", "output_root", "seeds", "datasets", "tasks", "optimizers",
        "batch_lrs", "common",
    }  # fmt: skip
    unknown = sorted(set(raw) - known)
    if unknown:
        raise GridError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    for key in ("name", "datasets", "tasks", "optimizers", "batch_lrs"):
        if key not in raw:
            raise GridError(f"{path}: missing key {key!r}")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise GridError(f"{path}: seeds: expected a list of non-negative integers")

    datasets = {}
    for name, spec in _mapping(raw["datasets"], "datasets").items():
        spec = _mapping(spec, f"datasets.{name}")
        if "config" not in spec:
            raise GridError(f"datasets.{name}: missing key 'config' (the base experiment YAML)")
        datasets[name] = {
            "config": str(spec["config"]),
            "overrides": _overrides(spec.get("overrides"), f"datasets.{name}.overrides"),
        }
    tasks = {
        name: {"overrides": _overrides(_mapping(spec, name).get("overrides"), f"tasks.{name}")}
        for name, spec in _mapping(raw["tasks"], "tasks").items()
    }
    optimizers = {}
    for name, spec in _mapping(raw["optimizers"], "optimizers").items():
        spec = _mapping(spec, f"optimizers.{name}")
        per_task = _mapping(spec.get("per_task"), f"optimizers.{name}.per_task")
        for task in per_task:
            if task not in tasks:
                raise GridError(f"optimizers.{name}.per_task: {task!r} is not one of the tasks")
        optimizers[name] = {
            "overrides": _overrides(spec.get("overrides"), f"optimizers.{name}.overrides"),
            "per_task": {
                task: _overrides(values, f"optimizers.{name}.per_task.{task}")
                for task, values in per_task.items()
            },
            "batch_lrs": _batch_lrs(spec["batch_lrs"], f"optimizers.{name}.batch_lrs")
            if "batch_lrs" in spec
            else None,
        }
    return Grid(
        name=str(raw["name"]),
        launcher=str(raw.get("launcher", "accelerate launch")),
        output_root=str(raw.get("output_root", f"runs/{raw['name']}")),
        seeds=seeds,
        datasets=datasets,
        tasks=tasks,
        optimizers=optimizers,
        batch_lrs=_batch_lrs(raw["batch_lrs"], "batch_lrs"),
        common=_overrides(raw.get("common"), "common"),
    )


def parse_filters(filters: list[str]) -> dict[str, set[str]]:
    """``key=value`` filters; the same key given twice means either value."""
    parsed: dict[str, set[str]] = {}
    for text in filters:
        key, sep, value = text.partition("=")
        if not sep or key not in FILTER_KEYS:
            raise GridError(f"--filter {text!r}: expected KEY=VALUE, KEY one of {FILTER_KEYS}")
        if key in ("batch", "lr", "seed"):
            try:
                value = format_number(float(value)) if key == "lr" else str(int(value))
            except ValueError:
                raise GridError(f"--filter {text!r}: {key} must be a number") from None
        parsed.setdefault(key, set()).add(value)
    return parsed


def select(runs: list[Run], filters: dict[str, set[str]]) -> list[Run]:
    return [run for run in runs if all(run.labels[k] in v for k, v in filters.items())]


def _executable(command: list[str]) -> list[str]:
    """``python`` / ``accelerate`` as the ones of the running interpreter's environment."""
    here = Path(sys.executable).parent
    if command[0] in ("python", "python3"):
        return [sys.executable, *command[1:]]
    if (here / command[0]).exists():
        return [str(here / command[0]), *command[1:]]
    return command


def run_all(runs: list[Run], launcher: str, extra: tuple[str, ...], rerun: bool) -> int:
    """Run sequentially; a failed run is reported and the next one starts. Returns #failures."""
    failures = 0
    for index, run in enumerate(runs, 1):
        if not rerun and (run.output_dir / "metrics.json").exists():
            print(f"[{index}/{len(runs)}] {run.name}: finished, skipped", flush=True)
            continue
        # An unfinished run (interrupted: a directory without metrics.json) starts over.
        overwrite = rerun or run.output_dir.exists()
        command = run.command(launcher, (*extra, *(("run.overwrite=true",) if overwrite else ())))
        print(f"[{index}/{len(runs)}] {shlex.join(command)}", flush=True)
        if subprocess.run(_executable(command), check=False).returncode != 0:
            failures += 1
            print(f"[{index}/{len(runs)}] {run.name}: FAILED", flush=True)
    return failures


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2
        raise GridError(message)


def main(argv: list[str] | None = None) -> int:
    parser = _ArgumentParser(
        prog="python -m tvlars_scale.paper.grid", description=__doc__.splitlines()[0]
    )
    parser.add_argument("action", choices=("print", "run", "count"))
    parser.add_argument("--grid", default=DEFAULT_GRID, help=f"grid YAML (default {DEFAULT_GRID})")
    parser.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                        help=f"keep runs whose KEY ({', '.join(FILTER_KEYS)}) is VALUE")  # fmt: skip
    parser.add_argument("--launcher", help="replace the grid's launcher (e.g. 'python')")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run (e.g. batch.micro_batch_size=128)")  # fmt: skip
    parser.add_argument("--rerun", action="store_true", help="run finished runs again (overwrite)")
    try:
        args = parser.parse_args(argv)
        grid = load_grid(args.grid)
        runs = select(grid.runs(), parse_filters(args.filter))
        for override in args.set:
            if "=" not in override or "." not in override.partition("=")[0]:
                raise GridError(f"--set {override!r}: expected a dotted KEY=VALUE")
    except GridError as error:
        print(f"grid error: {error}", file=sys.stderr)
        return 2
    launcher = args.launcher or grid.launcher
    if args.action == "count":
        print(len(runs))
        return 0
    if args.action == "print":
        for run in runs:
            print(shlex.join(run.command(launcher, tuple(args.set))))
        return 0
    failures = run_all(runs, launcher, tuple(args.set), args.rerun)
    print(f"{len(runs) - failures} of {len(runs)} runs finished; {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
