"""The figures render to PNG files from the telemetry format the trainer writes."""

import json

from tvlars_scale.paper.plots import main, read_layer_stats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
    assert main(["layers", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no per-layer telemetry" in capsys.readouterr().err


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
