"""A grid study run in-process, with each solution's sharpness; its table and its figure.

``run`` trains the runs of a grid YAML (:mod:`tvlars_scale.paper.grid`) one after another in this
process with the package's :class:`~tvlars_scale.trainer.Trainer` (no process start per run: on a
few CPU cores the runs are seconds each), skips finished ones (``metrics.json``), and writes each
run's sharpness, the largest eigenvalue of the Hessian of its training loss at the final weights
(:mod:`tvlars_scale.paper.sharpness`), into ``RUN_DIR/sharpness.json``. ``summarize`` reads the
finished runs back (``config.yaml``, ``metrics.json``, ``sharpness.json``) into a table (markdown,
CSV, JSON) and a plot of accuracy against batch size per optimizer::

    OMP_NUM_THREADS=1 python -m tvlars_scale.paper.study run --grid configs/digits_regime.yaml \\
        [--seeds 0 1 2] [--filter task=classification ...] [--budget-minutes 45]
    ... run --grid G --extend-edges 2        # seed 0: move each cell's LR range off its best
    ... run --grid G --best-lr-only --seeds 1 2   # further seeds at each cell's best LR
    python -m tvlars_scale.paper.study summarize runs/digits_regime --out results/digits_regime

Runs go seed by seed (all of seed 0, then seed 1, ...), classification before Barlow Twins, so a
study stopped by its time budget holds whole seeds, never a partial grid for one seed; the further
seeds at each cell's best LR (``--best-lr-only``) go cell by cell, so it holds whole cells.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import yaml

from tvlars_scale.paper.grid import GridError, Run, format_number, load_grid, parse_filters, select
from tvlars_scale.paper.small_resnet import register_small_resnets

SHARPNESS_FILE = "sharpness.json"
LABELS_FILE = "labels.json"  # the grid's labels of the run (its optimizer setting's name)
METRIC_BY_TASK = {"classification": "test_accuracy", "barlow_twins": "linear_test_accuracy"}
TASK_ORDER = ("classification", "barlow_twins")
TASK_TITLES = {"classification": "Classification", "barlow_twins": "Barlow Twins (linear eval.)"}


def register_small_model() -> None:
    """``digits_cnn_small``: the package's digits CNN at width 16 (24K parameters, ~1/4 the
    compute of width 32), so the study's grid fits a CPU budget. Registered with timm once."""
    import timm
    from timm.models import register_model

    from tvlars_scale.models import digits_cnn

    if timm.is_model("digits_cnn_small"):
        return

    def digits_cnn_small(pretrained: bool = False, **kwargs):
        return digits_cnn(pretrained, width=16, **kwargs)

    register_model(digits_cnn_small)


def ordered(runs: list[Run], middle_lr_first: bool = False) -> list[Run]:
    """Seed-major: every run of seed 0 (classification first), then seed 1, ...

    ``middle_lr_first``: within a (seed, task), every (optimizer, batch)'s middle target LR before
    its others, so a study stopped early has every cell at one LR rather than some at all three.
    """
    lrs_of = defaultdict(set)
    for run in runs:
        lrs_of[_cell_key(run.labels)].add(float(run.labels["lr"]))

    def key(run: Run) -> tuple:
        task = run.labels["task"]
        rank = TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER)
        lrs = sorted(lrs_of[_cell_key(run.labels)])
        not_middle = middle_lr_first and float(run.labels["lr"]) != lrs[len(lrs) // 2]
        return int(run.labels["seed"]), rank, not_middle

    return sorted(runs, key=key)  # stable: the grid's order within a (seed, task)


def measure_sharpness(trainer, *, samples: int, max_iterations: int, rtol: float) -> dict:
    """Top Hessian eigenvalue of the task's training loss on the first ``samples`` training images,
    one fixed draw of the training augmentation (the task's RNG is restored before every loss, so
    each Hessian-vector product differentiates the same function), weights as trained."""
    from tvlars_scale.paper.sharpness import top_hessian_eigenvalue

    task, model = trainer.task, trainer.accelerator.unwrap_model(trainer.model)
    images = trainer.data.train_images[:samples].to(trainer.accelerator.device)
    labels = trainer.data.train_labels[:samples].to(trainer.accelerator.device)
    rng = task.state_dict()
    model.train()  # the training loss's function (Barlow Twins' projector: batch statistics)

    def loss():
        task.load_state_dict(rng)
        return task.training_loss(model, images, labels)

    started = time.perf_counter()
    eigen = top_hessian_eigenvalue(
        loss, list(model.parameters()), max_iterations=max_iterations, rtol=rtol
    )
    task.load_state_dict(rng)
    return {
        "top_eigenvalue": eigen.value,
        "iterations": eigen.iterations,
        "converged": eigen.converged,
        "samples": len(labels),
        "seconds": time.perf_counter() - started,
    }


class Preempted(Exception):
    """A signal stopped a run early: the study stops too (run it again to resume)."""


def run_one(run: Run, output_dir: Path, extra: list[str], sharpness: dict | None) -> dict:
    from tvlars_scale.config import load_config
    from tvlars_scale.trainer import Trainer

    config = load_config(run.config, [*run.overrides, *extra, f"run.output_dir={output_dir}"])
    trainer = Trainer(config)
    trainer.setup()
    try:
        (output_dir / LABELS_FILE).write_text(json.dumps(run.labels) + "\n")
        metrics = trainer.train()
        if trainer.preemption.received is not None:
            # SIGTERM / SIGUSR1: the trainer checkpointed and stopped early; so does the study
            # (the run, without metrics.json, starts over next time).
            raise Preempted(run.name)
        if sharpness is not None:
            result = measure_sharpness(trainer, **sharpness)
            (output_dir / SHARPNESS_FILE).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        trainer.close()
    return metrics


def run_at(grid, labels: dict, lr: float) -> Run:
    """The run of ``labels``' (dataset, task, optimizer, batch, seed) at target LR ``lr``, which
    need not be one of the grid's: the same overrides, name and directory scheme as the grid's."""
    optimizer = labels["optimizer"]
    spec = {**grid.optimizers[optimizer], "batch_lrs": {int(labels["batch"]): [lr]}}
    one = dataclasses.replace(grid, optimizers={optimizer: spec}, seeds=[int(labels["seed"])])
    (run,) = select(one.runs(), {key: {labels[key]} for key in ("dataset", "task")})
    return run


def seed_lrs(rows: list[dict], seed: int = 0) -> dict[tuple[str, str, int], list[float]]:
    """(task, optimizer, batch) -> the target LRs finished on ``seed``, ascending."""
    lrs = defaultdict(set)
    for row in rows:
        if row["seed"] == seed:
            lrs[_cell_key(row)].add(row["lr"])
    return {key: sorted(values) for key, values in lrs.items()}


def edge(lrs: list[float], best: float) -> str | None:
    """``"low"`` / ``"high"`` where ``best`` is the lowest / highest of the cell's ``lrs`` (the
    optimum may lie beyond: the range has not bracketed it), ``None`` where it is inside,
    ``"single"`` where only one LR has run."""
    if len(lrs) == 1:
        return "single"
    if best == lrs[0]:
        return "low"
    return "high" if best == lrs[-1] else None


def _three_digits(value: float) -> float:
    return float(f"{value:.3g}")


def edge_extensions(
    rows: list[dict], grid_lrs: dict[tuple[str, str, int], list[float]], max_extensions: int
) -> tuple[dict[tuple[str, str, int], float], list[tuple[str, str, int]]]:
    """The next seed-0 LR of each cell of ``grid_lrs`` whose best LR on seed 0 is still the lowest
    or highest it has run: one step outward by the cell's own ratio at that edge (the edge LR over
    its neighbour's; three significant digits). A cell waits until the grid's LRs have all
    finished; it stops at ``max_extensions`` LRs beyond the grid's range (returned as capped).
    Returns ({cell: next LR}, [capped cells])."""
    best, done = best_lrs(rows), seed_lrs(rows)
    todo, capped = {}, []
    for cell, grid_range in grid_lrs.items():
        lrs = done.get(cell, [])
        if len(grid_range) < 2 or not set(grid_range) <= set(lrs) or cell not in best:
            continue  # no ratio to step by, the grid's own LRs unfinished, or every run diverged
        side = edge(lrs, best[cell])
        if side is None:
            continue
        step = lrs[0] / lrs[1] if side == "low" else lrs[-1] / lrs[-2]
        outward = _three_digits(best[cell] * step)
        if len(set(lrs) - set(grid_range)) >= max_extensions or outward in lrs:
            capped.append(cell)
        else:
            todo[cell] = outward
    return todo, capped


def _train(
    runs: list[Run], root: Path, args: argparse.Namespace, deadline: float
) -> tuple[int, bool]:
    """Trains the unfinished ``runs`` in order. Returns (failures, whether the time budget
    stopped it); raises :class:`Preempted` on a signal."""
    sharpness = dict(samples=args.sharpness_samples, max_iterations=args.sharpness_iterations,
                     rtol=args.sharpness_rtol)  # fmt: skip
    failures = 0
    for index, run in enumerate(runs, 1):
        output_dir = root / run.name
        done = (output_dir / "metrics.json").exists()
        measure = int(run.labels["seed"]) in args.sharpness_seeds
        if done and (not measure or (output_dir / SHARPNESS_FILE).exists()):
            continue
        if time.monotonic() > deadline:
            print(f"budget spent: stopped before {run.name} ({len(runs) - index + 1} left)")
            return failures, True
        # No accumulation: the digits CNN has no batch statistics, so micro = global changes no
        # gradient, and Barlow Twins' exact accumulation would only add forwards.
        extra = [f"batch.micro_batch_size={run.labels['batch']}", "run.overwrite=true", *args.set]
        started = time.perf_counter()
        try:
            metrics = run_one(run, output_dir, extra, sharpness if measure else None)
        except Preempted:
            print(f"[{index}/{len(runs)}] {run.name}: preempted; the study stops", flush=True)
            raise
        except Exception as error:  # one failed run must not end the study
            failures += 1
            print(f"[{index}/{len(runs)}] {run.name}: FAILED: {error}", flush=True)
            continue
        final = metrics.get("final", {})
        value = final.get(METRIC_BY_TASK.get(run.labels["task"], "test_accuracy"), float("nan"))
        print(f"[{index}/{len(runs)}] {run.name}: top-1 {100 * value:.2f} "
              f"({time.perf_counter() - started:.1f} s)", flush=True)  # fmt: skip
    return failures, False


def _extend_edges(grid, runs: list[Run], root: Path, args, deadline: float) -> int:
    """Seed 0 of ``runs``' cells: their grid LRs, then rounds of :func:`edge_extensions` until no
    cell's best is at an edge or every such cell is capped."""
    runs = [run for run in runs if run.labels["seed"] == "0"]
    failures, stopped = _train(ordered(runs, args.middle_lr_first), root, args, deadline)
    labels, grid_lrs = {}, defaultdict(list)
    for run in runs:
        labels.setdefault(_cell_key(run.labels), run.labels)
        grid_lrs[_cell_key(run.labels)].append(float(run.labels["lr"]))
    while not failures and not stopped:
        todo, capped = edge_extensions(collect(root), grid_lrs, args.extend_edges)
        if not todo:
            for cell in capped:
                print(f"{'/'.join(map(str, cell))}: best LR still at an edge after "
                      f"{args.extend_edges} extensions (the cap)", flush=True)  # fmt: skip
            break
        extension = [run_at(grid, labels[cell], lr) for cell, lr in todo.items()]
        failures, stopped = _train(extension, root, args, deadline)
    return failures


def run_study(args: argparse.Namespace) -> int:
    register_small_model()
    register_small_resnets()
    grid = load_grid(args.grid)
    runs = select(grid.runs(), parse_filters(args.filter))
    if args.seeds is not None:
        runs = [run for run in runs if int(run.labels["seed"]) in args.seeds]
    root = Path(args.output_root or grid.output_root)
    if args.best_lr_only:
        # Each cell's best LR on seed 0 among its finished runs, an edge extension's included.
        best = best_lrs(collect(root))
        runs = [run_at(grid, run.labels, best[_cell_key(run.labels)])
                for run in runs if _cell_key(run.labels) in best]  # fmt: skip
        # One per (cell, seed) (the grid lists each of its LRs), cell by cell in the grid's order
        # (its seeds innermost): a study stopped early has every seed of the cells it reached.
        runs = list(dict.fromkeys(runs))
    deadline = time.monotonic() + 60 * args.budget_minutes if args.budget_minutes else math.inf
    try:
        if args.extend_edges is not None:
            failures = _extend_edges(grid, runs, root, args, deadline)
        else:
            order = runs if args.best_lr_only else ordered(runs, args.middle_lr_first)
            failures, _ = _train(order, root, args, deadline)
    except Preempted:
        return 1
    return 1 if failures else 0


# --- summarize ---------------------------------------------------------------------------------


def collect(root: Path) -> list[dict]:
    """Every finished study run under ``root`` (``labels.json`` names its grid optimizer)."""
    rows = []
    for metrics_path in sorted(root.glob("*/metrics.json")):
        run_dir = metrics_path.parent
        if not (run_dir / LABELS_FILE).exists():
            continue  # not a study run
        labels = json.loads((run_dir / LABELS_FILE).read_text())
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        task = config["task"]["name"]
        final = json.loads(metrics_path.read_text()).get("final", {})
        sharp_path = run_dir / SHARPNESS_FILE
        sharp = json.loads(sharp_path.read_text()) if sharp_path.exists() else {}
        rows.append(
            {
                "task": task,
                "optimizer": labels["optimizer"],
                "batch": int(config["batch"]["global_batch_size"]),
                "lr": float(config["optim"]["lr"]),
                "seed": int(config["run"]["seed"]),
                "top1": 100 * float(final.get(METRIC_BY_TASK.get(task, "test_accuracy"), math.nan)),
                "sharpness": sharp.get("top_eigenvalue"),
            }
        )
    return rows


def _cell_key(labels: dict) -> tuple[str, str, int]:
    return labels["task"], labels["optimizer"], int(labels["batch"])


def best_lrs(rows: list[dict], seed: int = 0) -> dict[tuple[str, str, int], float]:
    """(task, optimizer, batch) -> the target LR with the best top-1 of ``seed``'s runs (the
    smaller LR on a tie). The LR is chosen on one seed; further seeds then run at that LR only,
    so their accuracies are not themselves selected."""
    best: dict[tuple[str, str, int], tuple[float, float]] = {}
    for row in rows:
        if row["seed"] != seed or math.isnan(row["top1"]):
            continue
        key, candidate = _cell_key(row), (row["top1"], -row["lr"])
        if key not in best or candidate > best[key]:
            best[key] = candidate
    return {key: -negative_lr for key, (_, negative_lr) in best.items()}


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per (task, optimizer, batch, lr): mean / std over seeds, and the best LR marked
    (the best top-1 of seed 0 among the cell's LRs: :func:`best_lrs`), with its ``edge``
    (``"low"`` / ``"high"`` where it is the lowest / highest LR run on seed 0: :func:`edge`)."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["optimizer"], row["batch"], row["lr"])].append(row)
    cells = []
    for (task, optimizer, batch, lr), members in groups.items():
        top1, top1_std = _mean_std([m["top1"] for m in members])
        sharp = [m["sharpness"] for m in members if m["sharpness"] is not None]
        cells.append(
            {
                "task": task, "optimizer": optimizer, "batch": batch, "lr": lr,
                "seeds": len(members), "top1_mean": round(top1, 3), "top1_std": round(top1_std, 3),
                "sharpness_mean": round(statistics.fmean(sharp), 4) if sharp else None,
                "sharpness_runs": len(sharp), "best_lr": False, "edge": None,
            }
        )  # fmt: skip
    chosen, tried = best_lrs(rows), seed_lrs(rows)
    for cell in cells:
        cell["best_lr"] = chosen.get(_cell_key(cell)) == cell["lr"]
        if cell["best_lr"]:
            cell["edge"] = edge(tried[_cell_key(cell)], cell["lr"])
    return sorted(cells, key=lambda c: (c["task"], c["optimizer"], c["batch"], c["lr"]))


def _accuracy(cell: dict) -> str:
    """``mean ± std (seeds)``; one seed has no spread to show: ``value (1)``."""
    if cell["seeds"] == 1:
        return f"{cell['top1_mean']:.2f} (1)"
    return f"{cell['top1_mean']:.2f} ± {cell['top1_std']:.2f} ({cell['seeds']})"


EDGE_MARKS = {"low": " (edge ↓)", "high": " (edge ↑)", "single": " (one LR)", None: ""}


def render_markdown(
    cells: list[dict],
    optimizers: list[str],
    test_split: str = "the 360 test images",
    complete: bool = True,
) -> str:
    """``complete``: seed 0 has run every LR of the grid (else the headings say "so far")."""
    out = []
    tasks = [t for t in TASK_ORDER if any(c["task"] == t for c in cells)]
    for task in tasks:
        mine = [c for c in cells if c["task"] == task]
        batches = sorted({c["batch"] for c in mine})
        present = [o for o in optimizers if any(c["optimizer"] == o for c in mine)]
        lrs_run = Counter((c["optimizer"], c["batch"]) for c in mine).values()
        low, high = min(lrs_run), max(lrs_run)
        span = f"{low} to {high}" if high > low else f"{low}"
        if complete:
            what = f"best of {span} target LRs per cell"
        else:  # a study stopped early: say so in the heading, not only in the coverage lines
            what = f"best of the target LRs run so far per cell ({span}; seed 0 INCOMPLETE)"
        out += [f"### {TASK_TITLES.get(task, task)}: {what}", ""]
        out += ["| optimizer | " + " | ".join(f"B={b}" for b in batches) + " |"]
        out += ["|---|" + "---|" * len(batches)]
        for optimizer in present:
            line = [optimizer]
            for batch in batches:
                best = [c for c in mine if (c["optimizer"], c["batch"], c["best_lr"]) ==
                        (optimizer, batch, True)]  # fmt: skip
                if not best:
                    line.append("—")
                    continue
                c = best[0]
                sharp = (
                    f"; λmax {c['sharpness_mean']:.3g}" if c["sharpness_mean"] is not None else ""
                )
                line.append(f"{_accuracy(c)} @ lr {format_number(c['lr'])}"
                            f"{EDGE_MARKS[c['edge']]}{sharp}")  # fmt: skip
            out.append("| " + " | ".join(line) + " |")
        out.append("")
        out += [f"#### {TASK_TITLES.get(task, task)}: every cell", ""]
        out += ["| optimizer | B | lr | top-1 % (mean ± std, seeds) | sharpness λmax (runs) |",
                "|---|---|---|---|---|"]  # fmt: skip
        for c in sorted(mine, key=lambda c: (present.index(c["optimizer"]), c["batch"], c["lr"])):
            sharp = (f"{c['sharpness_mean']:.4g} ({c['sharpness_runs']})"
                     if c["sharpness_mean"] is not None else "—")  # fmt: skip
            mark = f" *{EDGE_MARKS[c['edge']]}" if c["best_lr"] else ""
            out.append(f"| {c['optimizer']} | {c['batch']} | {format_number(c['lr'])}{mark} | "
                       f"{_accuracy(c)} | {sharp} |")  # fmt: skip
        out.append("")
    out.append(f"Top-1 accuracy (%) on {test_split}; classification: the classifier, Barlow "
               "Twins: a linear classifier on the frozen backbone. λmax: the largest Hessian "
               "eigenvalue of the training loss at the final weights (mean over the runs that "
               "measured it). * = the best LR of its batch (on seed 0); edge ↓ / ↑: that best "
               "is the lowest / highest LR run, so the range has not bracketed the optimum.")  # fmt: skip
    return "\n".join(out) + "\n"


def plot(
    cells: list[dict], optimizers: list[str], path: Path, reference: float | None = None
) -> None:
    """Accuracy at each cell's best LR against batch size, one line per optimizer, one panel per
    task; ``reference``: Barlow Twins' random-init linear evaluation (mean over seeds), dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASK_ORDER if any(c["task"] == t for c in cells)]
    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        for optimizer in optimizers:
            best = sorted((c for c in cells if c["task"] == task and c["optimizer"] == optimizer
                           and c["best_lr"]), key=lambda c: c["batch"])  # fmt: skip
            if not best:
                continue
            xs = [c["batch"] for c in best]
            axis.errorbar(xs, [c["top1_mean"] for c in best], yerr=[c["top1_std"] for c in best],
                          marker="o", capsize=3, label=optimizer)  # fmt: skip
        if task == "barlow_twins" and reference is not None:
            axis.axhline(
                reference, color="grey", linestyle="--", label="random init (no pretraining)"
            )
        axis.set_xscale("log", base=2)
        axis.set_xlabel("global batch size")
        axis.set_ylabel("top-1 accuracy (%), best LR of the cell")
        axis.set_title(TASK_TITLES.get(task, task))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def coverage(rows: list[dict], grid_cells: set[tuple]) -> list[str]:
    """One line per (task, seed) saying what it covers: seed 0, the grid's cells (every target
    LR); a further seed, the cells whose best LR on seed 0 it has run, naming those it has not
    (a study stopped part-way, or a best LR moved by an edge extension and not yet rerun): their
    table entries then average fewer seeds, and say so."""
    best = best_lrs(rows)
    lines = []
    tasks = sorted({row["task"] for row in rows}, key=lambda t: (t not in TASK_ORDER, t))
    for task in tasks:
        full = {c for c in grid_cells if c[0] == task}
        chosen = {(*key, lr) for key, lr in best.items() if key[0] == task}
        for seed in sorted({row["seed"] for row in rows if row["task"] == task}):
            have = {(*_cell_key(row), row["lr"]) for row in rows
                    if (row["task"], row["seed"]) == (task, seed)}  # fmt: skip
            if seed == 0:
                what = (f"all {len(full)} cells (every target LR)" if have >= full
                        else f"{len(have & full)} of {len(full)} cells (INCOMPLETE)")  # fmt: skip
                if have - full:
                    what += f", and {len(have - full)} edge extensions"
            elif have >= chosen:
                what = f"the best LR of each of the {len(chosen)} (optimizer, batch)"
            else:
                missing = sorted(f"{c[1]}/{c[2]}" for c in chosen - have)
                what = (f"the best LR of {len(chosen & have)} of the {len(chosen)} (optimizer, "
                        f"batch); not yet: {', '.join(missing)}")  # fmt: skip
            lines.append(f"- {TASK_TITLES.get(task, task)}, seed {seed}: {what}")
    return lines


def random_init_reference(grid, seeds: list[int]) -> dict[int, float]:
    """Barlow Twins' linear evaluation (top-1 %) of the backbone at its initialisation, per seed:
    the score a pretraining must beat to have learnt anything. The initial model depends on the
    seed and the model only, so any Barlow Twins run of the seed defines it."""
    import torch
    from accelerate.utils import set_seed

    from tvlars_scale.config import load_config
    from tvlars_scale.data import load_image_data
    from tvlars_scale.tasks import build_task

    register_small_model()
    reference = {}
    for seed in seeds:
        runs = select(grid.runs(), {"task": {"barlow_twins"}, "seed": {str(seed)}})
        if not runs:
            continue
        config = load_config(runs[0].config, list(runs[0].overrides))
        data = load_image_data(config.data.name)
        set_seed(config.run.seed)  # as the trainer seeds before it builds the model
        task = build_task(config, data, 0)
        model = task.build_model().eval()
        with torch.no_grad():
            outputs = task.eval_outputs(model, data.test_images, data.test_labels)
            reference[seed] = 100 * task.eval_metrics(outputs)["linear_test_accuracy"]
    return reference


def summarize(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid)
    optimizers = list(grid.optimizers)
    rows = collect(args.runs_dir)
    if not rows:
        print(f"study error: {args.runs_dir}: no finished runs", file=sys.stderr)
        return 2
    grid_cells = {(*_cell_key(run.labels), float(run.labels["lr"])) for run in grid.runs()}
    lines = coverage(rows, grid_cells)
    cells = aggregate(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    bt_seeds = sorted({row["seed"] for row in rows if row["task"] == "barlow_twins"})
    reference = random_init_reference(grid, bt_seeds) if bt_seeds else {}
    if reference:
        values = ", ".join(f"{value:.2f} (seed {seed})" for seed, value in reference.items())
        lines.append(f"- Barlow Twins reference: the same linear evaluation of the backbone at "
                     f"its random initialisation (no pretraining): {values}")  # fmt: skip
    seeds_note = "\n".join(["", "Runs per task and seed:", *lines, ""])
    complete = {(*_cell_key(row), row["lr"]) for row in rows if row["seed"] == 0} >= grid_cells
    (args.out / "table.md").write_text(
        render_markdown(cells, optimizers, args.test_split, complete) + seeds_note
    )
    with open(args.out / "table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(cells[0]))
        writer.writeheader()
        writer.writerows(cells)
    (args.out / "runs.json").write_text(json.dumps(rows, indent=0) + "\n")
    (args.out / "table.json").write_text(json.dumps(cells, indent=1) + "\n")
    mean_reference = statistics.fmean(reference.values()) if reference else None
    plot(cells, optimizers, args.out / "accuracy_vs_batch.png", mean_reference)
    expected = len(select(grid.runs(), {}))
    print(f"{len(rows)} finished runs of the grid's {expected}; wrote table.md, table.csv, "
          f"table.json, runs.json, accuracy_vs_batch.png to {args.out}")  # fmt: skip
    return 0


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2
        raise GridError(message)


def main(argv: list[str] | None = None) -> int:
    parser = _ArgumentParser(prog="python -m tvlars_scale.paper.study",
                             description=__doc__.splitlines()[0])  # fmt: skip
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="train the grid's unfinished runs in this process")
    run.add_argument("--grid", default="configs/digits_regime.yaml")
    run.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--output-root", help="run directories' root (default: the grid's)")
    run.add_argument("--seeds", type=int, nargs="+", help="only these seeds (default: the grid's)")
    run.add_argument("--best-lr-only", action="store_true",
                     help="only each (task, optimizer, batch)'s best LR on seed 0 (finished runs)")  # fmt: skip
    run.add_argument("--middle-lr-first", action="store_true",
                     help="each cell's middle target LR first, then the others (per seed)")  # fmt: skip
    run.add_argument("--extend-edges", type=int, metavar="MAX",
                     help="seed 0: then, while a cell's best LR is its lowest / highest, one more "
                          "LR outward by its ratio, at most MAX beyond the grid's per cell")  # fmt: skip
    run.add_argument("--budget-minutes", type=float, help="start no run after this many minutes")
    run.add_argument("--sharpness-seeds", type=int, nargs="*", default=[0],
                     help="seeds whose runs measure sharpness (default: 0)")  # fmt: skip
    run.add_argument("--sharpness-samples", type=int, default=256)
    run.add_argument("--sharpness-iterations", type=int, default=20)
    run.add_argument("--sharpness-rtol", type=float, default=1e-2)
    summary = sub.add_parser("summarize", help="table + plot of the finished runs")
    summary.add_argument("runs_dir", type=Path)
    summary.add_argument("--grid", default="configs/digits_regime.yaml")
    summary.add_argument("--out", type=Path, required=True)
    summary.add_argument("--test-split", default="the 360 test images",
                         help="what the table's note says the accuracy is measured on")  # fmt: skip
    try:
        args = parser.parse_args(argv)
        if args.action == "run" and args.extend_edges is not None:
            if args.extend_edges < 1:
                raise GridError(f"--extend-edges {args.extend_edges}: must be at least 1")
            if args.best_lr_only or (args.seeds is not None and args.seeds != [0]):
                raise GridError("--extend-edges: seed 0 only (the LR is chosen on seed 0); "
                                "no --best-lr-only, no --seeds other than 0")  # fmt: skip
        return run_study(args) if args.action == "run" else summarize(args)
    except GridError as error:
        print(f"study error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
