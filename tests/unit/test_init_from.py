"""model.init_from: a checkpoint, an export or a weights file; every backbone tensor loaded, a new
head where the class count differs, what was and was not loaded reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from tvlars_scale.config import Config, ConfigError
from tvlars_scale.data.types import ImageData
from tvlars_scale.export import WEIGHTS_FILE, export_checkpoint
from tvlars_scale.models import build_model
from tvlars_scale.tasks import build_configured_model
from tvlars_scale.tasks.barlow_twins import BarlowTwinsTask
from tvlars_scale.training.init_from import load_initial_weights

NUM_CLASSES = 10


def _digits(num_classes: int = NUM_CLASSES) -> ImageData:
    images = torch.zeros(20, 1, 8, 8, dtype=torch.uint8)
    labels = torch.arange(20) % num_classes
    return ImageData(images, labels, images, labels, num_classes, (0.5,), (0.25,), "digits")


def _config(**sections) -> Config:
    return Config.model_validate({"model": {"name": "digits_cnn"}, **sections})


def _classifier(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_configured_model(_config(), _digits())


@pytest.fixture(scope="module")
def barlow_twins(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A Barlow Twins checkpoint directory (model.pt + config.yaml) and its state_dict."""
    config = _config(task={"name": "barlow_twins", "projector_dims": [16, 16]})
    torch.manual_seed(0)
    model = BarlowTwinsTask(config, _digits(), 0).build_model()
    with torch.no_grad():  # "trained": no tensor equals a fresh initialisation's
        for tensor in model.state_dict().values():
            tensor.add_(torch.rand_like(tensor) + 0.5 if tensor.is_floating_point() else 1)
    checkpoint = tmp_path_factory.mktemp("bt") / "checkpoints" / "step-5"
    checkpoint.mkdir(parents=True)
    torch.save(model.state_dict(), checkpoint / "model.pt")
    (checkpoint / "config.yaml").write_text(config.to_yaml())
    return checkpoint, model.state_dict()


def test_fine_tune_from_an_export_loads_every_backbone_tensor_and_reports_the_new_head(
    barlow_twins, tmp_path
):
    checkpoint, _ = barlow_twins
    export = export_checkpoint(checkpoint, tmp_path / "export", mean=[0.5], std=[0.25])
    exported = safetensors.torch.load_file(export / WEIGHTS_FILE)
    model, fresh = _classifier(), _classifier()
    lines = load_initial_weights(model, export)

    state = model.state_dict()
    backbone = [name for name in state if not name.startswith("head.")]
    assert sorted(exported) == sorted(backbone)  # the export is the backbone, all of it
    for name in backbone:
        assert torch.equal(state[name], exported[name]), name
        assert not torch.equal(state[name], fresh.state_dict()[name]), name
    for name in ("head.weight", "head.bias"):  # the new head keeps its fresh initialisation
        assert torch.equal(state[name], fresh.state_dict()[name])
    assert lines == [
        f"model.init_from: export {export}: loaded {len(backbone)} of the model's "
        f"{len(state)} tensors",
        "model.init_from: new head, freshly initialised: head.weight [10, 128] (source: absent), "
        "head.bias [10] (source: absent)",
    ]


def test_a_barlow_twins_checkpoint_gives_its_backbone_not_its_projector(barlow_twins):
    checkpoint, saved = barlow_twins
    model = _classifier()
    # A run directory names its newest complete checkpoint; this one has no manifest, so the
    # checkpoint itself is given.
    lines = load_initial_weights(model, checkpoint)
    for name, tensor in model.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(tensor, saved[f"backbone.{name}"]), name
    projector = sorted(name for name in saved if name.startswith("projector."))
    assert projector and lines[-1] == (
        f"model.init_from: not loaded from the source ({len(projector)}): {', '.join(projector)}"
    )


def test_weights_files_load_through_timm_with_a_new_head_for_another_class_count(tmp_path):
    torch.manual_seed(7)
    pretrained = build_model("digits_cnn", 1000, in_chans=1, image_size=8)
    path = tmp_path / "pretrained.safetensors"
    safetensors.torch.save_file(pretrained.state_dict(), path)
    model = _classifier()
    lines = load_initial_weights(model, path)
    assert "head.weight [10, 128] (source: [1000, 128])" in lines[1]
    assert lines[2] == "model.init_from: not loaded from the source (2): head.bias, head.weight"
    for name, tensor in model.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(tensor, pretrained.state_dict()[name]), name

    # A torch file as timm's training writes it: a state_dict key, DDP's module. prefixes.
    same_classes = _classifier(seed=3)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in same_classes.state_dict().items()}}
    torch.save(wrapped, tmp_path / "model.pth")
    model = _classifier()
    lines = load_initial_weights(model, tmp_path / "model.pth")
    assert len(lines) == 1  # everything loaded, the head too
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, same_classes.state_dict()[name]), name


def test_weights_of_another_network_or_no_weights_are_refused(tmp_path):
    torch.save(build_model("resnet18", NUM_CLASSES).state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(ConfigError) as error:
        load_initial_weights(_classifier(), tmp_path / "resnet.pt")
    assert error.value.key == "model.init_from"
    assert f"{tmp_path / 'resnet.pt'} does not fit the model" in error.value.problem
    assert "features.0.weight [32, 1, 3, 3] (source: absent)" in error.value.problem
    for bad in (tmp_path / "missing", tmp_path):
        with pytest.raises(ConfigError) as error:
            load_initial_weights(_classifier(), bad)
        assert error.value.key == "model.init_from" and "\n" not in error.value.problem
    (tmp_path / "torn.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="cannot read"):
        load_initial_weights(_classifier(), tmp_path / "torn.safetensors")
