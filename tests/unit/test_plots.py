"""The figures render to PNG files from the telemetry format the trainer writes."""

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import LogNorm

from tvlars_scale.paper.plots import (
    LAYER_METRICS,
    layer_stats_figure,
    layer_ticks,
    main,
    read_layer_stats,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KEYS = [key for key, _ in LAYER_METRICS]


def write_layer_stats(run, names, steps, excluded=()):
    """layer_stats.jsonl with distinct values per (layer, step, metric), in the trainer's format;
    ``excluded`` layers have a trust ratio pinned at 1. Returns {metric: layers x steps}."""
    run.mkdir(parents=True, exist_ok=True)
    expected = {key: np.zeros((len(names), len(steps))) for key in KEYS}
    lines = []
    for s, step in enumerate(steps):
        layers = {}
        for i, name in enumerate(names):
            stats = {
                "weight_norm": 1.0 + i + 0.01 * s,
                "update_norm": 0.5 / (1 + s) + 0.001 * i,
                "trust_ratio": 1.0 if name in excluded else 1e-3 * (1 + i) * (1 + 0.1 * s),
            }
            for key in KEYS:
                expected[key][i, s] = stats[key]
            layers[name] = stats
        lines.append(json.dumps({"step": step, "lr": 1.0, "phi_t": 0.5, "layers": layers}))
    (run / "layer_stats.jsonl").write_text("\n".join(lines) + "\n")
    return expected


def panels(fig):
    """The three metric panels of the first run (colour bars are axes too, without an image)."""
    return [ax for ax in fig.axes if ax.images][:3]


def test_phi_figure(tmp_path):
    out = tmp_path / "phi.png"
    assert main(["phi", "--out", str(out), "--num-steps", "1000"]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_layer_figure_from_layer_stats_jsonl(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = []
    for step in range(1, 6):
        layers = {
            "conv.weight": {"weight_norm": 3.0 + step, "update_norm": 1.0 / step, "trust_ratio": 0.01 * step},
            "conv.bias": {"weight_norm": 0.1, "update_norm": 0.2, "trust_ratio": 1.0},
        }  # fmt: skip
        lines.append(json.dumps({"step": step, "lr": 1.0, "phi_t": 0.5, "layers": layers}))
    (run / "layer_stats.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "layers.png"
    assert main(["layers", str(run), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    capsys.readouterr()
    assert main(["layers", str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no per-layer telemetry" in err
    assert err.count("\n") == 1  # one line, no traceback


def test_many_layers_draw_named_heat_maps_of_the_logged_values(tmp_path):
    names = [f"stages.{i // 10}.blocks.{i % 10}.conv.weight" for i in range(150)]
    excluded = [f"stages.{i}.norm.weight" for i in range(15)]  # trust ratio 1: left out by default
    steps = list(range(10, 210, 10))  # 20 log steps
    expected = write_layer_stats(tmp_path / "run", names + excluded, steps, excluded=set(excluded))
    fig = layer_stats_figure([tmp_path / "run"], titles=["resnet-ish"])
    try:
        axes = panels(fig)
        assert len(axes) == 3
        for ax, key in zip(axes, KEYS, strict=True):
            image = ax.images[0]
            np.testing.assert_allclose(image.get_array().filled(np.nan), expected[key][:150])
            assert isinstance(image.norm, LogNorm)
            assert image.colorbar is not None
            assert image.colorbar.ax.get_ylabel().endswith("(log scale)")
            formatter = ax.xaxis.get_major_formatter()
            assert [formatter(0, 0), formatter(19, 0)] == ["10", "200"]  # columns are the steps
        assert "trust ratio" in axes[2].images[0].colorbar.ax.get_ylabel()
        # Layer names on the y axis: a thinned subset, every k-th layer from the first, in model order.
        positions = [int(p) for p in axes[0].get_yticks()]
        labels = [label.get_text() for label in axes[0].get_yticklabels()]
        assert labels == [names[p] for p in positions]
        assert positions[0] == 0 and 10 <= len(positions) < 150
        assert len(set(np.diff(positions))) == 1 and np.diff(positions)[0] > 1
        assert not set(labels) & set(excluded)
        assert "15 excluded (not shown)" in axes[0].get_ylabel()
    finally:
        plt.close(fig)


def test_all_layers_show_the_excluded_ones_below_with_no_trust_ratio(tmp_path):
    names = [f"block{i}.weight" for i in range(8)] + [f"block{i}.bias" for i in range(8)]
    excluded = set(names[8:])
    expected = write_layer_stats(tmp_path / "run", names, [1, 2, 3], excluded=excluded)
    fig = layer_stats_figure([tmp_path / "run"], all_layers=True)
    try:
        weight, _, trust = panels(fig)
        np.testing.assert_allclose(
            weight.images[0].get_array().filled(np.nan), expected["weight_norm"]
        )
        trust_values = trust.images[0].get_array()
        np.testing.assert_allclose(trust_values[:8].filled(np.nan), expected["trust_ratio"][:8])
        assert trust_values.mask[8:].all()  # pinned at 1: greyed, not drawn as a measurement
        labels = weight.get_yticklabels()
        assert [label.get_text() for label in labels] == names  # 16 fit: all named
        grey = [label.get_text() for label in labels if label.get_color() != "black"]
        assert grey == names[8:]
    finally:
        plt.close(fig)


def test_few_layers_draw_lines_with_a_legend_naming_each(tmp_path):
    names = ["stem.weight", "block1.weight", "block2.weight", "block3.weight", "head.weight"]
    expected = write_layer_stats(
        tmp_path / "run", [*names, "head.bias"], [5, 10, 15, 20], {"head.bias"}
    )
    fig = layer_stats_figure([tmp_path / "run"])
    try:
        axes = fig.axes[:3]
        assert not any(ax.images for ax in axes)
        legends = [ax.get_legend() for ax in axes if ax.get_legend() is not None]
        assert len(legends) == 1
        assert [text.get_text() for text in legends[0].get_texts()] == names
        for ax, key in zip(axes, KEYS, strict=True):
            assert [line.get_label() for line in ax.lines] == names
            np.testing.assert_allclose([line.get_ydata() for line in ax.lines], expected[key][:5])
    finally:
        plt.close(fig)


def test_heatmap_style_for_few_layers_and_png(tmp_path):
    write_layer_stats(tmp_path / "run", ["a.weight", "b.weight"], [1, 2])
    out = tmp_path / "layers.png"
    assert main(["layers", str(tmp_path / "run"), "--style", "heatmap", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no records"),
        ('{"step": 1, "layers": {}}\nnot json\n', "layer_stats.jsonl:2: not JSON"),
        ('{"step": 1}\n', "layer_stats.jsonl:1: a record needs 'step' and 'layers'"),
        ('{"step": 1, "layers": {}}\n', "no layers in the records"),
    ],
)
def test_malformed_telemetry_is_a_one_line_error(tmp_path, capsys, content, message):
    (tmp_path / "layer_stats.jsonl").write_text(content)
    assert main(["layers", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_layer_ticks_name_every_kth_layer_within_the_budget():
    assert layer_ticks(10, 40) == list(range(10))
    assert layer_ticks(150, 40) == list(range(0, 150, 4))
    assert layer_ticks(161, 50) == list(range(0, 161, 4))
    assert layer_ticks(0, 40) == []


def test_resumed_run_keeps_the_later_record_of_a_repeated_step(tmp_path):
    steps_logged = [
        (1, 0.1),
        (2, 0.2),
        (3, 0.3),
        (2, 0.25),
        (3, 0.35),
    ]  # crash after 3, resume at 1
    (tmp_path / "layer_stats.jsonl").write_text(
        "".join(
            json.dumps({"step": step, "layers": {"w": {"trust_ratio": value}}}) + "\n"
            for step, value in steps_logged
        )
    )
    records = read_layer_stats(tmp_path)
    assert [(r["step"], r["layers"]["w"]["trust_ratio"]) for r in records] == [
        (1, 0.1),
        (2, 0.25),
        (3, 0.35),
    ]
