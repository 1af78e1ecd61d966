"""Fashion-MNIST: IDX files (gzipped or not), the hub path, the Debian download script, the study's
small ResNet and its run order. Small generated IDX files: nothing here needs the real data."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

from tvlars_scale.data import DataError, load_image_data
from tvlars_scale.data.idx import read_idx
from tvlars_scale.models import build_model
from tvlars_scale.paper.grid import load_grid
from tvlars_scale.paper.small_resnet import SmallResNet, register_small_resnets
from tvlars_scale.paper.study import ordered
from tvlars_scale.train import main as train_main

REPO = Path(__file__).resolve().parents[2]
STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array, written out by hand (independent of the reader)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def write_fashion(directory: Path, gzipped: bool, num_train: int = 24, num_test: int = 8) -> dict:
    """A Fashion-MNIST-shaped directory of random 28x28 images; returns what it holds."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    arrays = {}
    for split, count in (("train", num_train), ("test", num_test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        for stem, array in zip(STEMS[split], (images, labels), strict=True):
            raw = idx_bytes(array)
            if gzipped:
                (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
            else:
                (directory / stem).write_bytes(raw)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("gzipped", [True, False])
def test_a_directory_of_idx_files_loads_as_fashion_mnist(tmp_path, gzipped):
    arrays = write_fashion(tmp_path / "fm", gzipped)
    data = load_image_data("fashion-mnist", path=str(tmp_path / "fm"))
    (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape == (24, 1, 28, 28)
    assert torch.equal(data.train_images[:, 0], torch.from_numpy(train_x))
    assert torch.equal(data.test_images[:, 0], torch.from_numpy(test_x))
    assert data.train_labels.dtype == torch.int64
    assert data.train_labels.tolist() == train_y.tolist()
    assert data.test_labels.tolist() == test_y.tolist()
    assert data.num_classes == 10 and data.in_chans == 1 and data.image_size == 28
    # Normalisation: the training images' own mean and std on the 0..1 scale.
    assert data.mean[0] == pytest.approx(train_x.mean() / 255, rel=1e-9)
    assert data.std[0] == pytest.approx(train_x.std() / 255, rel=1e-9)
    small = load_image_data("fashion-mnist", path=str(tmp_path / "fm"), image_size=14)
    assert small.train_images.shape == (24, 1, 14, 14)


def test_bad_idx_files_fail_with_one_line_naming_the_file(tmp_path):
    write_fashion(tmp_path / "fm", gzipped=False)
    labels = tmp_path / "fm" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])  # one label short
    with pytest.raises(
        DataError, match=r"t10k-labels-idx1-ubyte.*needs 16 bytes, the file has 15"
    ) as error:
        load_image_data("fashion-mnist", path=str(tmp_path / "fm"))
    assert "\n" not in str(error.value)
    labels.unlink()
    with pytest.raises(DataError, match="has no t10k-labels-idx1-ubyte"):
        load_image_data("fashion-mnist", path=str(tmp_path / "fm"))
    not_idx = tmp_path / "x.gz"
    not_idx.write_bytes(gzip.compress(b"\x1f\x8b not idx"))
    with pytest.raises(DataError, match="not an unsigned-byte IDX file"):
        read_idx(str(not_idx))
    (tmp_path / "broken.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"cannot read IDX file .*broken\.gz"):
        read_idx(str(tmp_path / "broken.gz"))
    counts = write_fashion(tmp_path / "mismatch", gzipped=True)
    images = counts["train"][0][:-1]  # 23 images for 24 labels
    (tmp_path / "mismatch" / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(images))
    )
    with pytest.raises(DataError, match=r"train images .* and labels .* are not"):
        load_image_data("fashion-mnist", path=str(tmp_path / "mismatch"))


def test_a_directory_without_idx_files_goes_to_the_hub_loader(tmp_path, monkeypatch):
    """The hub's zalando-datasets/fashion_mnist layout (image + ClassLabel, train/test), saved."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    rng = np.random.default_rng(1)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
    )

    def split(count):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        return images, datasets.Dataset.from_dict(
            {"image": [Image.fromarray(i, mode="L") for i in images], "label": [3] * count},
            features=features,
        )

    (_, train), (test_x, test) = split(6), split(2)
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "saved"))
    data = load_image_data("fashion-mnist", path=str(tmp_path / "saved"))
    assert data.train_images.shape == (6, 1, 28, 28) and data.num_classes == 10
    assert torch.equal(data.test_images[:, 0], torch.from_numpy(test_x))


def test_dry_run_counts_the_images_of_an_idx_directory(tmp_path, capsys):
    write_fashion(tmp_path / "fm", gzipped=True, num_train=30, num_test=10)
    argv = ["--config", str(REPO / "configs" / "digits.yaml"), "--dry-run",
            "data.name=fashion-mnist", f"data.path={tmp_path / 'fm'}",
            "batch.global_batch_size=8", "batch.micro_batch_size=8",
            f"run.output_dir={tmp_path / 'run'}"]  # fmt: skip
    assert train_main(argv) == 0
    assert "data fashion-mnist: 30 train / 10 test images" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_get_script_fails_with_one_line_where_apt_is_missing(tmp_path):
    script = str(REPO / "launch" / "get_fashion_mnist.sh")
    empty = tmp_path / "bin"
    empty.mkdir()
    result = subprocess.run(
        ["/bin/bash", script, str(tmp_path / "out")],
        env={"PATH": str(empty)}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "no apt-get here" in result.stderr
    assert not (tmp_path / "out").exists()
    usage = subprocess.run(["/bin/bash", script], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_small_resnet_is_a_batchnorm_resnet_built_by_name():
    register_small_resnets()
    model = build_model("resnet8_w8", num_classes=10, in_chans=1, image_size=14)
    assert isinstance(model, SmallResNet)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 1 + 3 * 2 + 2  # stem, two per block, two projection shortcuts
    widths = [stage[0].conv2.out_channels for stage in model.stages]
    assert widths == [8, 16, 32]
    logits = model(torch.randn(4, 1, 14, 14))
    assert logits.shape == (4, 10)
    features = model.forward_features(torch.randn(2, 1, 28, 28))
    assert features.shape == (2, 32, 7, 7)  # 28 -> 28 -> 14 -> 7
    assert model.forward_head(features, pre_logits=True).shape == (2, 32)


def test_middle_lr_first_puts_every_cells_middle_lr_before_the_others():
    grid = load_grid(REPO / "configs" / "fashion_regime.yaml")
    runs = [r for r in grid.runs() if r.labels["seed"] == "0"]
    plain, middle = ordered(runs), ordered(runs, middle_lr_first=True)
    assert [r.name for r in plain] == [r.name for r in runs]  # the grid's order by default
    assert sorted(r.name for r in middle) == sorted(r.name for r in runs)
    cells = {(r.labels["optimizer"], r.labels["batch"]) for r in runs}
    head = middle[: len(cells)]
    assert {(r.labels["optimizer"], r.labels["batch"]) for r in head} == cells
    for run in head:
        lrs = sorted(
            float(r.labels["lr"])
            for r in runs
            if (r.labels["optimizer"], r.labels["batch"])
            == (run.labels["optimizer"], run.labels["batch"])
        )
        assert float(run.labels["lr"]) == lrs[1]
