"""The batch-augmentation and init_from keys load, and tvlars-eval's arguments: a bad value is one
line naming the key, exit status 2, nothing written. (Their bad values are in test_config's table.)"""

from __future__ import annotations

import pytest
import torch

from tvlars_scale.config import Config, load_config
from tvlars_scale.evaluate import main as eval_main


def test_defaults_change_nothing_and_good_values_load():
    data = load_config("digits").data
    assert (data.augment, data.mixup_alpha, data.cutmix_alpha, data.mixes()) == (
        "none",
        0,
        0,
        False,
    )
    config = load_config("digits", ["data.cutmix_alpha=1", "data.mixup_switch_prob=0.3"])
    assert config.data.mixes() and load_config("digits").model.init_from is None


@pytest.fixture
def checkpoint(tmp_path):
    """A classification checkpoint directory (model.pt + config.yaml) of digits_cnn."""
    from tvlars_scale.models import build_model

    path = tmp_path / "checkpoints" / "step-3"
    path.mkdir(parents=True)
    torch.save(
        build_model("digits_cnn", 10, in_chans=1, image_size=8).state_dict(), path / "model.pt"
    )
    (path / "config.yaml").write_text(
        Config.model_validate({"model": {"name": "digits_cnn"}}).to_yaml()
    )
    return path


def test_eval_arguments_exit_2_with_one_line(tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bt = tmp_path / "bt" / "step-1"
    bt.mkdir(parents=True)
    (bt / "model.pt").write_bytes(b"")
    (bt / "config.yaml").write_text("task: {name: barlow_twins}\n")
    cases = [
        ([str(tmp_path / "missing")], "config error: PATH: ", "does not exist"),
        ([str(tmp_path)], "config error: PATH: ", "nor an export directory"),
        ([str(checkpoint), "optim.lr=1"], "config error: optim.lr: ", "data.* and batch."),
        ([str(checkpoint), "data.crop_padding=-1"], "config error: data.crop_padding: ", "0"),
        ([str(bt)], "config error: PATH: ", "barlow_twins checkpoint: no classifier"),
        ([str(checkpoint), "--out", str(tmp_path)], "config error: --out: ", "directory"),
        (["--out"], "config error: arguments: ", "expected one argument"),
    ]
    for args, start, detail in cases:
        assert eval_main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(start) and detail in err, err
    assert not (tmp_path / "eval.json").exists()


def test_train_with_unreadable_init_weights_exits_2_writing_nothing(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    run_dir = tmp_path / "run"
    overrides = [f"run.output_dir={run_dir}", f"model.init_from={tmp_path / 'none.safetensors'}"]
    result = subprocess.run(
        [sys.executable, "-m", "tvlars_scale.train", "--config", "digits", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("config error: model.init_from: ") and "does not exist" in (
        result.stderr
    )
    assert not run_dir.exists()
