"""The paper's figures as PNGs: phi_t over the lambda grid (Figure 3), per-layer norms (Figure 2).

    python -m tvlars_scale.paper.plots phi --out phi.png [--lmbdas 1e-2 1e-3 ...] [--delay-steps 0]
    python -m tvlars_scale.paper.plots layers RUN_DIR [RUN_DIR ...] --out layers.png

``layers`` reads the per-layer telemetry a run logs at every ``run.log_every`` optimizer steps,
``RUN_DIR/layer_stats.jsonl``: one JSON object per line,
``{"step": int, "lr": float, "phi_t": float | null, "layers": {name: {"weight_norm": float,
"update_norm": float, "trust_ratio": float}}}`` (the optimizer's ``layer_stats()``, merged over
ranks under ZeRO). One row of three panels per run: weight norm ||w||, update norm ||g + wd w||
and trust ratio, one line per adapted layer coloured by depth (first layer dark, last bright).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training node
import matplotlib.pyplot as plt
import numpy as np
import yaml

from tvlars_scale.optim.schedules import phi
from tvlars_scale.paper.report import optimizer_label
from tvlars_scale.telemetry import LAYER_STATS_FILE

PAPER_LAMBDAS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
LAYER_METRICS = (
    ("weight_norm", "weight norm ||w||"),
    ("update_norm", "update norm ||g + wd w||"),
    ("trust_ratio", "trust ratio"),
)


def plot_phi(
    out: Path,
    lmbdas=PAPER_LAMBDAS,
    num_steps: int = 10_000_000,
    delay_steps: int = 0,
    alpha: float = 1.0,
    gamma_min: float = 0.0,
) -> Path:
    """phi_t of TVLARS for each lambda, on a log step axis that shows every transition."""
    steps = np.unique(np.geomspace(1, num_steps, 600).astype(int))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for lmbda in lmbdas:
        values = [phi(int(t), lmbda, alpha, delay_steps, gamma_min) for t in steps]
        ax.plot(steps, values, label=rf"$\lambda$ = {lmbda:g}")
    ax.set_xscale("log")
    ax.set_xlabel("optimizer step t")
    ax.set_ylabel(r"$\phi_t$")
    ax.set_title(
        r"TVLARS $\phi_t = 1 / (\alpha + e^{\lambda (t - d)}) + \gamma_{min}$"
        f"   (alpha {alpha:g}, d {delay_steps}, gamma_min {gamma_min:g})",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, out)


def read_layer_stats(run_dir: Path) -> list[dict]:
    path = run_dir / LAYER_STATS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no per-layer telemetry in this run directory")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # A resumed run logs the steps after its checkpoint again: the later record of a step wins.
    by_step = {record["step"]: record for record in records}
    return [by_step[step] for step in sorted(by_step)]


def plot_layer_stats(run_dirs: list[Path], out: Path, titles: list[str] | None = None) -> Path:
    """Figure 2: one row per run (titled from its config), columns weight norm / update norm /
    trust ratio, one line per layer."""
    fig, axes = plt.subplots(
        len(run_dirs), 3, figsize=(13, 3.0 * len(run_dirs)), dpi=72, squeeze=False
    )
    for row, run_dir in enumerate(run_dirs):
        records = read_layer_stats(run_dir)
        steps = [record["step"] for record in records]
        layers = _adapted_layers(records)
        colours = plt.cm.viridis(np.linspace(0, 1, len(layers)))
        for col, (key, label) in enumerate(LAYER_METRICS):
            ax = axes[row][col]
            for layer, colour in zip(layers, colours, strict=True):
                series = [record["layers"].get(layer, {}).get(key, np.nan) for record in records]
                ax.plot(steps, series, color=colour, linewidth=0.9)
            ax.set_yscale("log")
            if row == len(run_dirs) - 1:
                ax.set_xlabel("optimizer step")
            if row == 0:
                ax.set_title(label, fontsize=11)
            ax.grid(True, alpha=0.3)
        title = titles[row] if titles else _run_title(run_dir)
        axes[row][0].set_ylabel(f"{title}\n({len(layers)} adapted layers)", fontsize=9)
    return _save(fig, out)


def _adapted_layers(records: list[dict]) -> list[str]:
    """Layers with a trust ratio, in the optimizer's order (input to output). Layers excluded
    from adaptation (biases, norm layers) sit at exactly 1 throughout and are left out."""
    names = list(records[0]["layers"])
    adapted = [
        name
        for name in names
        if any(record["layers"].get(name, {}).get("trust_ratio", 1.0) != 1.0 for record in records)
    ]
    return adapted or names


def _run_title(run_dir: Path) -> str:
    """``TVLARS, classification, B 512, lr 2`` from the run's config; else the directory name."""
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        return run_dir.name
    config = yaml.safe_load(config_path.read_text())
    label = optimizer_label(config)
    batch, lr = config["batch"]["global_batch_size"], config["optim"]["lr"]
    return f"{label}, {config['task']['name']}\nB {batch}, lr {lr:g}"


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tvlars_scale.paper.plots", description=__doc__)
    sub = parser.add_subparsers(dest="figure", required=True)
    phi_parser = sub.add_parser("phi", help="Figure 3: phi_t over the lambda grid")
    phi_parser.add_argument("--out", type=Path, required=True)
    phi_parser.add_argument("--lmbdas", type=float, nargs="+", default=list(PAPER_LAMBDAS))
    phi_parser.add_argument("--num-steps", type=int, default=10_000_000)
    phi_parser.add_argument("--delay-steps", type=int, default=0)
    layers_parser = sub.add_parser("layers", help="Figure 2: per-layer norms of finished runs")
    layers_parser.add_argument("run_dirs", type=Path, nargs="+")
    layers_parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.figure == "phi":
            path = plot_phi(args.out, args.lmbdas, args.num_steps, args.delay_steps)
        else:
            path = plot_layer_stats(args.run_dirs, args.out)
    except (FileNotFoundError, KeyError, IndexError, json.JSONDecodeError) as error:
        print(f"plots error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
