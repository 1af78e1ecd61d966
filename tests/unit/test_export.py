"""Exporting a checkpoint's model: model.safetensors + model.json, reloaded through timm bitwise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

import tvlars_scale.export as export_module
from tvlars_scale.checkpoint import save_checkpoint
from tvlars_scale.config import Config
from tvlars_scale.data import load_image_data
from tvlars_scale.export import (
    META_FILE,
    WEIGHTS_FILE,
    ExportError,
    export_checkpoint,
    load_exported,
    main,
)
from tvlars_scale.models import build_model
from tvlars_scale.tasks.barlow_twins import BarlowTwinsModel

REPO = Path(__file__).resolve().parents[2]
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def _config(run: Path, **sections) -> Config:
    return Config.model_validate({"run": {"output_dir": str(run)}, **sections})


def _cifar_config(run: Path, **model) -> Config:
    return _config(run, data={"name": "cifar10"}, model={"name": "resnet18", **model})


def _save(run: Path, step: int, state: dict, config: Config, **metadata) -> Path:
    """A complete checkpoint as the trainer publishes it (rank 0 of one)."""
    return save_checkpoint(
        run,
        step,
        rank=0,
        world_size=1,
        rank_payload={"rng": {}},
        shared_payloads={"model.pt": state, "trainer.pt": {}, "config.yaml": config.to_yaml()},
        metadata={"epoch": 1, "num_samples": 64 * step, **metadata},
        keep_last=10,
    )


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights AND BatchNorm statistics, so a lost buffer changes eval outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.num_batches_tracked.fill_(7 + seed)
    return model.eval()


def _cifar_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _trained_like(build_model("resnet18", 10, in_chans=3, image_size=32), seed)


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith((".tmp-export", ".trash-export"))]


def test_cifar_resnet18_reloads_bitwise_through_timm(tmp_path):
    model = _cifar_resnet()
    run = tmp_path / "run"
    checkpoint = _save(run, 12, model.state_dict(), _cifar_config(run))

    out = export_checkpoint(checkpoint, mean=MEAN, std=STD)

    assert out == run / "export"
    assert sorted(p.name for p in out.iterdir()) == [META_FILE, WEIGHTS_FILE]  # no Hub config
    meta = json.loads((out / META_FILE).read_text())
    assert (meta["model"], meta["task"], meta["step"], meta["exported"]) == (
        "resnet18",
        "classification",
        12,
        "classifier",
    )
    assert (meta["num_classes"], meta["in_chans"], meta["image_size"]) == (10, 3, 32)
    assert meta["cifar_stem"] is True and meta["timm_pretrained"] is False
    assert meta["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert meta["pretrained_cfg"]["mean"] == list(MEAN) and meta["normalisation"]["std"] == list(
        STD
    )
    assert meta["config"] == _cifar_config(run).model_dump(mode="json")

    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        # The README recipe with timm and torch only.
        rebuilt = timm.create_model(meta["model"], **meta["timm_kwargs"])
        if meta["cifar_stem"]:
            rebuilt.conv1 = nn.Conv2d(
                meta["in_chans"], rebuilt.bn1.num_features, 3, padding=1, bias=False
            )
            rebuilt.maxpool = nn.Identity()
        timm.models.load_checkpoint(rebuilt, str(out / WEIGHTS_FILE))
        assert torch.equal(rebuilt.eval()(x), expected)
        assert torch.equal(load_exported(out)(x), expected)
    # Why model.json says timm_pretrained: false: timm alone builds the ImageNet stem.
    with pytest.raises(RuntimeError, match=r"conv1\.weight"):
        timm.create_model(
            "resnet18",
            pretrained=True,
            **meta["timm_kwargs"],
            pretrained_cfg_overlay=dict(meta["pretrained_cfg"], file=str(out / WEIGHTS_FILE)),
        )


def test_safetensors_holds_model_pt_tensor_for_tensor_even_shared_or_strided(tmp_path):
    model = _cifar_resnet(seed=1)
    state = model.state_dict()
    # Tied storage and a transposed view: safetensors refuses both as they are.
    state["layer1.0.bn2.running_mean"] = state["layer1.0.bn1.running_mean"]
    state["fc.weight"] = torch.randn(512, 10).t()
    run = tmp_path / "run"
    checkpoint = _save(run, 3, state, _cifar_config(run))
    saved = torch.load(checkpoint / "model.pt", weights_only=True)
    assert not saved["fc.weight"].is_contiguous()  # the case under test reached the file
    assert (
        saved["layer1.0.bn1.running_mean"].untyped_storage().data_ptr()
        == saved["layer1.0.bn2.running_mean"].untyped_storage().data_ptr()
    )

    out = export_checkpoint(checkpoint, tmp_path / "shipped")

    loaded = safetensors.torch.load_file(out / WEIGHTS_FILE)
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name
    assert not (run / "export").exists()  # --out respected


def test_registry_model_loads_with_timm_pretrained_and_local_dir(tmp_path):
    """Without the CIFAR stem timm rebuilds the model itself: pretrained_cfg_overlay and the
    Hub layout (config.json, read here from disk as 'local-dir:') both give the model back."""
    torch.manual_seed(2)
    model = _trained_like(build_model("resnet18", 10, image_size=32, cifar_stem=False), seed=2)
    run = tmp_path / "run"
    checkpoint = _save(run, 4, model.state_dict(), _cifar_config(run, cifar_stem=False))

    out = export_checkpoint(checkpoint, mean=MEAN, std=STD)

    meta = json.loads((out / META_FILE).read_text())
    assert meta["cifar_stem"] is False and meta["timm_pretrained"] is True
    weights = str(out / WEIGHTS_FILE)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        via_overlay = timm.create_model(
            meta["model"],
            pretrained=True,
            **meta["timm_kwargs"],
            pretrained_cfg_overlay=dict(meta["pretrained_cfg"], file=weights),
        ).eval()
        via_hub_layout = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        for rebuilt in (via_overlay, via_hub_layout):
            assert torch.equal(rebuilt(x), model(x))
            assert tuple(rebuilt.pretrained_cfg["mean"]) == MEAN
            assert tuple(rebuilt.pretrained_cfg["input_size"]) == (3, 32, 32)


def test_barlow_twins_exports_the_backbone_without_projector(tmp_path):
    torch.manual_seed(3)
    backbone = build_model("resnet18", 10, image_size=32)
    backbone.reset_classifier(0)
    bt_model = _trained_like(BarlowTwinsModel(backbone, backbone.num_features, [32, 16]), seed=3)
    run = tmp_path / "run"
    config = _config(
        run,
        data={"name": "cifar10"},
        model={"name": "resnet18"},
        task={"name": "barlow_twins", "projector_dims": [32, 16]},
    )
    checkpoint = _save(run, 9, bt_model.state_dict(), config)

    out = export_checkpoint(checkpoint, mean=MEAN, std=STD)

    meta = json.loads((out / META_FILE).read_text())
    assert (meta["exported"], meta["dropped"], meta["num_classes"]) == ("backbone", "projector", 0)
    loaded = safetensors.torch.load_file(out / WEIGHTS_FILE)
    assert loaded.keys() == backbone.state_dict().keys()
    assert not any(name.startswith(("projector", "fc.")) for name in loaded)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        features = load_exported(out)(x)
        assert features.shape == (4, backbone.num_features)
        assert torch.equal(features, bt_model(x))  # one view: the backbone's pooled features


def test_digits_cnn_exports_and_reloads(tmp_path):
    torch.manual_seed(4)
    model = build_model("digits_cnn", 10, in_chans=1, image_size=8).eval()
    run = tmp_path / "run"
    config = _config(run, data={"name": "digits", "flip": False}, model={"name": "digits_cnn"})
    checkpoint = _save(run, 20, model.state_dict(), config)

    out = export_checkpoint(checkpoint)  # digits is embedded: its statistics are recomputed

    meta = json.loads((out / META_FILE).read_text())
    assert meta["input_size"] == [1, 8, 8] and meta["timm_kwargs"] == {
        "num_classes": 10,
        "in_chans": 1,
    }
    assert meta["timm_pretrained"] is False and meta["cifar_stem"] is False
    digits = load_image_data("digits")
    assert meta["normalisation"]["mean"] == list(digits.mean)
    assert meta["pretrained_cfg"]["std"] == list(digits.std)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        rebuilt = timm.create_model("digits_cnn", **meta["timm_kwargs"])
        timm.models.load_checkpoint(rebuilt, str(out / WEIGHTS_FILE))
        assert torch.equal(rebuilt.eval()(x), model(x))
        assert torch.equal(load_exported(out)(x), model(x))


def _digits_cnn_run(run: Path, steps: tuple[int, ...]) -> dict[int, dict]:
    """Complete checkpoints at ``steps`` (synthetic 8 px data: its statistics are cheap)."""
    config = _config(
        run,
        data={"name": "synthetic", "num_synthetic": 32, "image_size": 8},
        model={"name": "digits_cnn"},
    )
    states = {}
    for step in steps:
        torch.manual_seed(step)
        states[step] = build_model("digits_cnn", 10, in_chans=3, image_size=8).state_dict()
        _save(run, step, states[step], config)
    return states


def test_cli_on_a_run_exports_its_newest_complete_checkpoint(tmp_path):
    """The one subprocess test (torch + timm's import: ~8 s); the error paths run ``main`` in
    process below, as ``python -m tvlars_scale.export`` does (``sys.exit(main())``)."""
    run = tmp_path / "run"
    states = _digits_cnn_run(run, (2, 5))
    checkpoints = run / "checkpoints"
    torn = checkpoints / ".tmp-step-9"  # newer, but torn by a crash: never exported
    torn.mkdir()
    torch.save(build_model("digits_cnn", 10, in_chans=3).state_dict(), torn / "model.pt")
    (torn / "config.yaml").write_text((checkpoints / "step-5" / "config.yaml").read_text())

    result = subprocess.run(
        [sys.executable, "-m", "tvlars_scale.export", str(run)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    out = run / "export"
    assert result.stdout.split() == [str(out / WEIGHTS_FILE), str(out / META_FILE)]
    assert json.loads((out / META_FILE).read_text())["step"] == 5
    loaded = safetensors.torch.load_file(out / WEIGHTS_FILE)
    assert loaded.keys() == states[5].keys()
    assert all(torch.equal(loaded[k], v) for k, v in states[5].items())
    assert not _leftovers(tmp_path)


def _break(checkpoint: Path, how: str) -> None:
    model_pt, config_yaml = checkpoint / "model.pt", checkpoint / "config.yaml"
    if how == "missing model.pt":
        model_pt.unlink()
    elif how == "truncated model.pt":
        model_pt.write_bytes(model_pt.read_bytes()[:1000])
    elif how == "garbage model.pt":  # same size: the manifest cannot tell, torch.load can
        model_pt.write_bytes(b"\x00" * model_pt.stat().st_size)
    elif how == "missing config.yaml":
        config_yaml.unlink()
    elif how == "invalid config.yaml":  # same size, no longer a config
        text = config_yaml.read_text()
        config_yaml.write_text(text.replace("batch:", "btach:", 1))
    elif how == "weights of another model":
        torch.manual_seed(0)
        model_pt.unlink()
        torch.save(build_model("resnet18", 10, image_size=32).state_dict(), model_pt)
        manifest = json.loads((checkpoint / "checkpoint.json").read_text())
        manifest["files"]["model.pt"] = model_pt.stat().st_size  # so the fit check is what fails
        (checkpoint / "checkpoint.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("how", "names"),
    [
        ("missing model.pt", "model.pt"),
        ("truncated model.pt", "model.pt"),
        ("garbage model.pt", "model.pt"),
        ("missing config.yaml", "config.yaml"),
        ("invalid config.yaml", "config.yaml"),
        ("weights of another model", "model.pt"),
    ],
)
def test_broken_checkpoint_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, how, names):
    run = tmp_path / "run"
    _digits_cnn_run(run, (3,))
    checkpoint = run / "checkpoints" / "step-3"
    _break(checkpoint, how)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    assert main([str(checkpoint)]) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("export error: "), captured.err
    assert names in lines[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    with pytest.raises(ExportError, match=names.replace(".", r"\.")):
        export_checkpoint(checkpoint)


def test_run_without_a_complete_checkpoint_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    _digits_cnn_run(run, (3,))
    (run / "checkpoints" / "step-3" / "checkpoint.json").unlink()  # torn before the manifest
    assert main([str(run)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main([str(run / "checkpoints" / ".tmp-step-3")]) == 2  # does not exist
    assert main([str(tmp_path / "nowhere")]) == 2
    assert not (run / "export").exists()


def test_crash_while_writing_keeps_the_earlier_export_whole(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _digits_cnn_run(run, (1, 2))
    first = export_checkpoint(run / "checkpoints" / "step-1")
    first_bytes = (first / WEIGHTS_FILE).read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module.safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="No space"):
        export_checkpoint(run / "checkpoints" / "step-2")
    assert json.loads((first / META_FILE).read_text())["step"] == 1
    assert (first / WEIGHTS_FILE).read_bytes() == first_bytes
    with pytest.raises(OSError):
        export_checkpoint(run / "checkpoints" / "step-2", tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists() and not _leftovers(tmp_path)

    monkeypatch.undo()
    assert (
        json.loads((export_checkpoint(run / "checkpoints" / "step-2") / META_FILE).read_text())[
            "step"
        ]
        == 2
    )  # an earlier export is replaced


def test_a_directory_that_is_not_an_export_is_never_replaced(tmp_path):
    run = tmp_path / "run"
    _digits_cnn_run(run, (1,))
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an export"):
        export_checkpoint(run / "checkpoints" / "step-1", precious)
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
    with pytest.raises(ExportError, match="not an export"):  # nor a checkpoint
        export_checkpoint(run / "checkpoints" / "step-1", run / "checkpoints" / "step-1")
