"""The paper's figures as PNGs: phi_t over the lambda grid (Figure 3), per-layer norms (Figure 2).

    python -m tvlars_scale.paper.plots phi --out phi.png [--lmbdas 1e-2 1e-3 ...] [--delay-steps 0]
    python -m tvlars_scale.paper.plots layers RUN_DIR [RUN_DIR ...] --out layers.png
        [--all-layers] [--style auto|lines|heatmap]

``layers`` reads the per-layer telemetry a run logs at every ``run.log_every`` optimizer steps,
``RUN_DIR/layer_stats.jsonl``: one JSON object per line,
``{"step": int, "lr": float, "phi_t": float | null, "layers": {name: {"weight_norm": float,
"update_norm": float, "trust_ratio": float}}}`` (the optimizer's ``layer_stats()``, merged over
ranks under ZeRO). One row of three panels per run: weight norm ||w||, update norm ||g + wd w||
(LAMB: its Adam direction) and trust ratio, each over the logged optimizer steps.

* Heat maps (``--style heatmap``, and ``auto`` when any run shows more than 12 layers, e.g. a
  ResNet-50's 54 adapted of 161 tensors): one row per layer, first layer at the top, one column per
  logged step; a log colour scale per panel with a labelled colour bar. The y axis names the layers,
  every k-th name when there are too many to be legible at the row's height (``layer_ticks``).
* Line plots (``--style lines``, and ``auto`` with at most 12 layers): one line per layer, coloured
  by depth (first layer dark, last bright), and a legend naming every layer.

Layer order is the file's, which is the optimizer's: its parameter groups one after the other, each
in model order (under ZeRO the groups' layers interleave by rank, each group still in model order).
The two groups cannot be merged back into one model order without the model, so they are shown apart.

Layers excluded from adaptation (biases, norm layers: the file records them with a trust ratio of
exactly 1 at every step, which is how they are recognised) are left out by default. With
``--all-layers`` they are shown separately: below the adapted ones, after a white rule, their names
in grey, their trust-ratio cells grey (pinned at 1, not measured); as dashed lines without a trust
ratio in the line plots. Grey cells elsewhere are values a log scale cannot show (0, missing).

The update/weight ratio ||u|| / ||w|| is not drawn: for the adapted layers it is eta / trust ratio
(LARS, TVLARS) or 1 / trust ratio (LAMB), so it repeats the trust-ratio panel.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training node
import matplotlib.pyplot as plt
import numpy as np
import yaml
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from tvlars_scale.optim.schedules import phi
from tvlars_scale.paper.report import optimizer_label
from tvlars_scale.telemetry import LAYER_STATS_FILE

PAPER_LAMBDAS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
LAYER_METRICS = (
    ("weight_norm", "weight norm ||w||"),
    ("update_norm", "update norm ||g + wd w||"),
    ("trust_ratio", "trust ratio"),
)
COLOURBAR_LABELS = {
    "weight_norm": "||w||",
    "update_norm": "||g + wd w||",
    "trust_ratio": "trust ratio",
}
HEATMAP_CMAPS = {"weight_norm": "viridis", "update_norm": "viridis", "trust_ratio": "magma"}
MAX_LINE_LAYERS = (
    12  # style "auto": line plots with a legend up to this many layers, else heat maps
)
STYLES = ("auto", "lines", "heatmap")
NAME_FONTSIZE = 7  # points, layer names on the heat maps' y axis
EXCLUDED_COLOUR = "0.55"


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
    """The run's records by step; a ``ValueError`` naming the file and line for a malformed one."""
    path = run_dir / LAYER_STATS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no per-layer telemetry in this run directory")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from None
        if not isinstance(record, dict) or "step" not in record or "layers" not in record:
            raise ValueError(f"{path}:{number}: a record needs 'step' and 'layers'")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    # A resumed run logs the steps after its checkpoint again: the later record of a step wins.
    by_step = {record["step"]: record for record in records}
    return [by_step[step] for step in sorted(by_step)]


@dataclass
class RunLayers:
    """One run's per-layer series: ``values[key]`` is layers x steps (NaN where not logged)."""

    title: str
    steps: list[int]
    names: list[str]  # shown layers: the adapted ones, then (all_layers) the excluded ones
    num_adapted: int
    num_excluded: int  # in the file, shown or not
    values: dict[str, np.ndarray]

    @property
    def excluded_shown(self) -> int:
        return len(self.names) - self.num_adapted


def load_run_layers(run_dir: Path, title: str | None = None, all_layers: bool = False) -> RunLayers:
    records = read_layer_stats(run_dir)
    adapted, excluded = split_layers(records)
    if not adapted and not excluded:
        raise ValueError(f"{run_dir / LAYER_STATS_FILE}: no layers in the records")
    # No adapted layer at all (every trust ratio 1): show the excluded ones rather than nothing.
    names = adapted + excluded if all_layers or not adapted else adapted
    values = {
        key: np.array(
            [
                [float(record["layers"].get(name, {}).get(key, np.nan)) for record in records]
                for name in names
            ],
            dtype=float,
        ).reshape(len(names), len(records))
        for key, _ in LAYER_METRICS
    }
    return RunLayers(
        title=title if title is not None else _run_title(run_dir),
        steps=[int(record["step"]) for record in records],
        names=names,
        num_adapted=len(adapted),
        num_excluded=len(excluded),
        values=values,
    )


def split_layers(records: list[dict]) -> tuple[list[str], list[str]]:
    """(adapted, excluded) layer names, each in the file's order (first appearance over the records).
    Excluded layers (biases, norm layers) have a trust ratio of exactly 1 in every record."""
    names = list(dict.fromkeys(name for record in records for name in record["layers"]))
    adapted = [
        name
        for name in names
        if any(record["layers"].get(name, {}).get("trust_ratio", 1.0) != 1.0 for record in records)
    ]
    adapted_set = set(adapted)
    return adapted, [name for name in names if name not in adapted_set]


def layer_ticks(num_layers: int, max_ticks: int) -> list[int]:
    """Row indices to name on a heat map's y axis: every k-th layer from the first, the smallest k
    that keeps at most ``max_ticks`` names (all of them when they fit)."""
    if num_layers <= 0:
        return []
    stride = max(1, math.ceil(num_layers / max(1, max_ticks)))
    return list(range(0, num_layers, stride))


def layer_stats_figure(
    run_dirs: list[Path],
    titles: list[str] | None = None,
    all_layers: bool = False,
    style: str = "auto",
) -> Figure:
    """Figure 2: one row per run (titled from its config), columns weight norm / update norm /
    trust ratio; heat maps over steps x layers or line plots with a legend (see the module doc)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose from {', '.join(STYLES)}")
    runs = [
        load_run_layers(run_dir, titles[row] if titles else None, all_layers)
        for row, run_dir in enumerate(run_dirs)
    ]
    if style == "auto":
        style = "lines" if max(len(run.names) for run in runs) <= MAX_LINE_LAYERS else "heatmap"
    if style == "lines":
        heights = [3.0] * len(runs)
        width = 15.5
    else:
        heights = [float(np.clip(0.06 * len(run.names) + 1.5, 3.0, 8.0)) for run in runs]
        width = 17.0
    fig, axes = plt.subplots(
        len(runs),
        3,
        figsize=(width, sum(heights)),
        dpi=72 if style == "lines" else 100,
        squeeze=False,
        layout="constrained",
        gridspec_kw={"height_ratios": heights},
    )
    for row, run in enumerate(runs):
        draw = _draw_lines if style == "lines" else _draw_heatmaps
        draw(axes[row], run, heights[row])
        for col, (_, label) in enumerate(LAYER_METRICS):
            if row == len(runs) - 1:
                axes[row][col].set_xlabel("optimizer step")
            if row == 0:
                axes[row][col].set_title(label, fontsize=11)
        counts = f"{run.num_adapted} adapted layers"
        if run.num_excluded:
            shown = "below, grey" if run.excluded_shown else "not shown"
            counts += f"\n{run.num_excluded} excluded ({shown})"
        axes[row][0].set_ylabel(f"{run.title}\n{counts}", fontsize=9)
    return fig


def plot_layer_stats(
    run_dirs: list[Path],
    out: Path,
    titles: list[str] | None = None,
    all_layers: bool = False,
    style: str = "auto",
) -> Path:
    return _save(layer_stats_figure(run_dirs, titles, all_layers, style), out)


def _draw_lines(axes, run: RunLayers, height: float) -> None:
    """One line per layer, coloured by depth within its group; excluded layers dashed, without a
    trust ratio; the legend (right of the row) names every layer."""
    colours = [
        *plt.cm.viridis(np.linspace(0, 0.9, run.num_adapted)),
        *plt.cm.Greys(np.linspace(0.45, 0.85, run.excluded_shown)),
    ]
    for col, (key, _) in enumerate(LAYER_METRICS):
        ax = axes[col]
        for index, name in enumerate(run.names):
            excluded = index >= run.num_adapted
            if excluded and key == "trust_ratio":
                continue
            ax.plot(
                run.steps,
                run.values[key][index],
                color=colours[index],
                linewidth=1.0,
                linestyle="--" if excluded else "-",
                label=name,
            )
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()  # every shown layer draws a weight norm
    axes[-1].legend(
        handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False
    )


def _draw_heatmaps(axes, run: RunLayers, height: float) -> None:
    """layers x steps images, first layer on top, a log colour scale and a colour bar per panel."""
    num_layers, num_steps = len(run.names), len(run.steps)
    max_ticks = int(0.8 * height * 72 / (1.5 * NAME_FONTSIZE))
    ticks = layer_ticks(num_layers, max_ticks)
    for col, (key, _) in enumerate(LAYER_METRICS):
        ax = axes[col]
        values = run.values[key].copy()
        if key == "trust_ratio":
            values[run.num_adapted :] = np.nan  # pinned at 1: not a measurement
        shown = np.ma.masked_invalid(np.where(values > 0, values, np.nan))
        cmap = plt.get_cmap(HEATMAP_CMAPS[key]).with_extremes(bad="0.85")
        image = ax.imshow(
            shown,
            aspect="auto",
            interpolation="nearest",
            origin="upper",
            cmap=cmap,
            norm=_log_norm(shown),
        )
        fig = ax.get_figure()
        fig.colorbar(
            image,
            ax=ax,
            label=f"{COLOURBAR_LABELS[key]} (log scale)",
            pad=0.01,
            fraction=0.05,
            aspect=20 * height / 3.0,  # as tall as the panel
        )
        if run.excluded_shown and run.num_adapted:
            ax.axhline(run.num_adapted - 0.5, color="white", linewidth=1.5)
        ax.set_yticks(ticks)
        if col == 0:
            ax.set_yticklabels([run.names[i] for i in ticks], fontsize=NAME_FONTSIZE)
            for tick_label, index in zip(ax.get_yticklabels(), ticks, strict=True):
                if index >= run.num_adapted:
                    tick_label.set_color(EXCLUDED_COLOUR)
        else:
            ax.set_yticklabels([])
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(_step_formatter(run.steps)))
        ax.set_xlim(-0.5, num_steps - 0.5)


def _log_norm(values: np.ma.MaskedArray) -> LogNorm:
    finite = values.compressed()
    if finite.size == 0:
        return LogNorm(vmin=0.1, vmax=10.0)
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        low, high = low / 2, high * 2
    return LogNorm(vmin=low, vmax=high)


def _step_formatter(steps: list[int]):
    """Column index -> its logged step (the columns are the records, whatever the steps' spacing)."""

    def label(position: float, _) -> str:
        index = round(position)
        return str(steps[index]) if 0 <= index < len(steps) and abs(position - index) < 1e-6 else ""

    return label


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
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tvlars_scale.paper.plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="figure", required=True)
    phi_parser = sub.add_parser("phi", help="Figure 3: phi_t over the lambda grid")
    phi_parser.add_argument("--out", type=Path, required=True)
    phi_parser.add_argument("--lmbdas", type=float, nargs="+", default=list(PAPER_LAMBDAS))
    phi_parser.add_argument("--num-steps", type=int, default=10_000_000)
    phi_parser.add_argument("--delay-steps", type=int, default=0)
    layers_parser = sub.add_parser("layers", help="Figure 2: per-layer norms of finished runs")
    layers_parser.add_argument("run_dirs", type=Path, nargs="+")
    layers_parser.add_argument("--out", type=Path, required=True)
    layers_parser.add_argument(
        "--all-layers",
        action="store_true",
        help="also the layers excluded from adaptation (biases, norm layers), shown apart in grey",
    )
    layers_parser.add_argument(
        "--style",
        choices=STYLES,
        default="auto",
        help=f"heat maps, or lines with a legend; auto: lines up to {MAX_LINE_LAYERS} layers",
    )
    args = parser.parse_args(argv)
    try:
        if args.figure == "phi":
            path = plot_phi(args.out, args.lmbdas, args.num_steps, args.delay_steps)
        else:
            path = plot_layer_stats(
                args.run_dirs, args.out, all_layers=args.all_layers, style=args.style
            )
    except (OSError, KeyError, IndexError, ValueError) as error:
        print(f"plots error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
