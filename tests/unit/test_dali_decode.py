"""data.decoder: dali, on DALI's CPU pipeline: the crop boxes, flips and order of the CPU decoder for
the same (seed, epoch, index), pixels within the decoders' tolerance, exact mid-epoch resume, the
config (an uninstalled DALI is one line, exit 2) and a short training run through it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from tvlars_scale.data import StreamingLoader, Transform, open_streaming
from tvlars_scale.data.decode import decode_crop
from tvlars_scale.train import main as train_main

SIDE = 32
# DALI decodes the box at full size and resizes it (antialiased bilinear); the CPU path decodes at
# a reduced DCT scale and crops on that grid (up to one scaled pixel wider), so their pixels
# differ. Measured on these photo-like images: DALI vs a full-size PIL decode + the exact box +
# PyTorch's antialiased resize, at most 2 grey levels (mean 0.03); DALI vs the CPU path, mean
# 3.2 levels per image (the largest 6.3), where a mirrored or another sample's crop is 35-75.
EXACT_MAX, EXACT_MEAN = 2, 0.1
CPU_PATH_MEAN = 8.0


@pytest.fixture(scope="module")
def dali():
    return pytest.importorskip("nvidia.dali")


def photo(rng: np.random.Generator) -> bytes:
    """A smooth (photo-like) RGB JPEG of 96-200 px a side, larger than the crops."""
    height, width = (int(v) for v in rng.integers(96, 200, 2))
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    coarse.resize((width, height), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """12 training images (one class each: a label names a sample) and 4 evaluation images."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for c in range(count):
            folder = root / split / f"n{c:04d}"
            folder.mkdir(parents=True)
            (folder / "img.JPEG").write_bytes(photo(rng))
    return root


def loaders(source, train=True, **kwargs) -> tuple[StreamingLoader, StreamingLoader]:
    """The CPU path and the DALI path over ``source``, alike in everything but the decoder."""
    from tvlars_scale.data.dali_decode import DaliStreamingLoader

    made = []
    for kind in (StreamingLoader, DaliStreamingLoader):
        transform = Transform(SIDE, train=train, seed=3)
        made.append(kind(source, transform, 4, 0, 1, seed=5, **kwargs))
    return made[0], made[1]


def exact_crop(data: bytes, box, flip: bool) -> torch.Tensor:
    """The box of the full-size image, resized by PyTorch (antialiased bilinear), mirrored."""
    full = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB")))
    left, top, width, height = box
    crop = full.permute(2, 0, 1)[None, :, top : top + height, left : left + width].double()
    out = F.interpolate(crop, size=(SIDE, SIDE), mode="bilinear", antialias=True)[0]
    out = out.round().clamp(0, 255)
    return out.flip(-1) if flip else out


@pytest.mark.parametrize("train", [True, False])
def test_the_same_boxes_flips_and_order_as_the_cpu_path(dali, tree, train):
    data = open_streaming("imagenet", str(tree), SIDE)
    source = data.train if train else data.test
    cpu, gpu_path = loaders(source, train=train, num_workers=0, shuffle=train)
    cpu.set_epoch(1)
    gpu_path.set_epoch(1)
    transform = Transform(SIDE, train=train, seed=3)
    flips = 0
    for (x_cpu, y_cpu), (x_dali, y_dali) in zip(cpu, gpu_path, strict=True):
        assert torch.equal(y_cpu, y_dali)  # the same samples, in the same order
        assert x_dali.shape == x_cpu.shape and x_dali.dtype == torch.uint8
        for sample, label in enumerate(y_dali.tolist()):
            encoded = source.read(label)  # one sample per class: the label is the index
            box, flip = transform.params(encoded, 1, label)
            flips += flip
            error = (x_dali[sample].double() - exact_crop(encoded, box, flip)).abs()
            assert error.max() <= EXACT_MAX and error.mean() <= EXACT_MEAN, (box, flip)
            to_cpu = (x_dali[sample].double() - x_cpu[sample].double()).abs().mean()
            assert to_cpu <= CPU_PATH_MEAN
            mirrored = decode_crop(encoded, box, SIDE, flip=not flip).double()
            assert (x_dali[sample].double() - mirrored).abs().mean() > 3 * to_cpu
    assert 0 < flips < len(source) if train else flips == 0


def test_grayscale_cmyk_and_png_decode_to_the_rgb_of_the_cpu_path(dali):
    from tvlars_scale.data.dali_decode import DaliDecoder

    def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **kwargs)
        return buffer.getvalue()

    decoder = DaliDecoder(8, 3, torch.device("cpu"), num_threads=1, seed=0)
    batch = [
        encode(Image.new("L", (40, 30), 90), "JPEG", quality=95),
        encode(Image.new("CMYK", (40, 30), (0, 200, 200, 0)), "JPEG", quality=95),
        encode(Image.new("RGB", (40, 30), (10, 200, 30)), "PNG"),  # ImageNet's PNG named .JPEG
    ]
    box = (0, 0, 40, 30)
    images = decoder([(data, box, False, index) for index, data in enumerate(batch)])
    for data, image in zip(batch, images, strict=True):
        expected = decode_crop(data, box, 8).double().mean(dim=(1, 2))
        assert torch.allclose(image.double().mean(dim=(1, 2)), expected, atol=1), expected


def test_resume_mid_epoch_with_two_workers_gives_the_same_batches_bitwise(dali, tree):
    from tvlars_scale.data.dali_decode import DaliStreamingLoader

    def make() -> DaliStreamingLoader:
        return DaliStreamingLoader(
            open_streaming("imagenet", str(tree), SIDE).train,
            Transform(SIDE, train=True, seed=3),
            2,
            0,
            1,
            seed=5,
            num_workers=2,
        )

    reference = make()
    reference.set_epoch(2)
    expected = list(reference)
    interrupted = make()
    interrupted.set_epoch(2)
    batches = iter(interrupted)
    for _ in range(2):
        next(batches)
    resumed = make()
    resumed.load_state_dict(interrupted.state_dict())
    resumed.set_epoch(2)
    rest = list(resumed)
    assert len(rest) == len(expected) - 2
    for (xa, ya), (xb, yb) in zip(expected[2:], rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # The next epoch, through the same (kept) pipeline and workers, crops anew.
    resumed.set_epoch(3)
    assert not torch.equal(next(iter(resumed))[0], expected[0][0])


def test_a_truncated_body_stops_with_one_line_naming_the_file(dali, tmp_path):
    from tvlars_scale.data import DataError

    rng = np.random.default_rng(1)
    for c in range(4):
        (tmp_path / "train" / f"n{c}").mkdir(parents=True)
        encoded = photo(rng)
        if c == 2:  # the header reads (the workers plan the crop), the decode fails
            encoded = encoded[: len(encoded) // 2]
        (tmp_path / "train" / f"n{c}" / "img.JPEG").write_bytes(encoded)
    (tmp_path / "val" / "n0").mkdir(parents=True)
    (tmp_path / "val" / "n0" / "img.JPEG").write_bytes(photo(rng))
    _, dali_loader = loaders(
        open_streaming("imagenet", str(tmp_path), SIDE).train, num_workers=1, shuffle=False
    )
    with pytest.raises(DataError, match=r"^unreadable image \S+/n2/img\.JPEG: DALI: \S") as caught:
        list(dali_loader)
    assert "\n" not in str(caught.value)


def write_config(tmp_path: Path, tree: Path, **data) -> Path:
    config = {
        "run": {
            "output_dir": str(tmp_path / "run"),
            "num_epochs": 1,
            "trackers": [],
            "progress_bar": False,
        },
        "data": {"name": "imagenet", "path": str(tree), "image_size": SIDE, "num_workers": 0},
        "model": {"name": "digits_cnn"},
        "batch": {"global_batch_size": 4, "micro_batch_size": 2},
    }
    config["data"].update(data)
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_dali_not_installed_is_one_config_line_exit_2_nothing_written(
    tree, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` now fails
    assert train_main(["--config", str(write_config(tmp_path, tree, decoder="dali"))]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "config error: data.decoder: dali needs NVIDIA DALI (pip install 'tvlars_scale[dali]')"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["data.augment=randaugment"], "dali does not apply data.augment=randaugment"),
        (["task.name=barlow_twins"], "dali decodes one view: Barlow Twins needs cpu"),
    ],
)
def test_what_dali_does_not_decode_is_refused(tree, tmp_path, capsys, overrides, line):
    """DALI cuts the boxes and flips only: per-sample policies and two views would be lost."""
    config = write_config(tmp_path, tree, decoder="dali")
    assert train_main(["--config", str(config), *overrides]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"config error: data.decoder: {line}"]
    assert not (tmp_path / "run").exists()


def test_a_run_trains_and_evaluates_through_dali_as_through_the_cpu_path(dali, tree, tmp_path):
    results = {}
    for decoder in ("cpu", "dali"):
        config = write_config(tmp_path / decoder, tree, decoder=decoder)
        assert train_main(["--config", str(config)]) == 0
        results[decoder] = json.loads((tmp_path / decoder / "run" / "metrics.json").read_text())
    cpu, dali_run = results["cpu"], results["dali"]
    assert dali_run["num_samples"] == cpu["num_samples"] == 12
    assert dali_run["num_steps"] == cpu["num_steps"] == 3
    # The same samples, crops and flips: the losses differ by the pixels' rounding only.
    assert dali_run["final"]["test_loss"] == pytest.approx(cpu["final"]["test_loss"], rel=0.02)


@pytest.mark.slow
def test_the_command_line_exits_after_a_run_with_decode_workers(dali, tree, tmp_path):
    """The workers ignore SIGTERM (pre-emption): a run that left them alive hung at exit, in
    multiprocessing's exit handler. A process of its own, as a user's run."""
    config = write_config(tmp_path, tree, decoder="dali", num_workers=1)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    completed = subprocess.run(
        [sys.executable, "-m", "tvlars_scale.train", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.json").exists()
