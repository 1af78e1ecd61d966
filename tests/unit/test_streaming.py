"""Streaming input: image-folder and save_to_disk sources, decode in workers, sharding, resume,
real-world image formats, the bad-image policy, config errors and the ImageNet recipes."""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tvlars_scale import build
from tvlars_scale.batching import plan_batches
from tvlars_scale.config import ConfigError, load_config
from tvlars_scale.data import DataError, StreamingLoader, Transform, open_streaming
from tvlars_scale.data.decode import decode_crop
from tvlars_scale.data.ssl_decode import TwoViewTransform
from tvlars_scale.data.streaming import StreamingData
from tvlars_scale.optim import schedules
from tvlars_scale.tasks import build_task
from tvlars_scale.train import main as train_main

REPO = Path(__file__).resolve().parents[2]
SIDE = 16  # crop side: small, so a test decodes hundreds of images in a second


def smooth_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A photo-like (smooth) RGB image, so that JPEG artefacts stay small."""
    coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def make_tree(root: Path, num_classes: int, per_class: int, val_per_class: int = 1) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c in range(num_classes):
            folder = root / split / f"n{c:04d}"
            folder.mkdir(parents=True)
            for i in range(count):
                height, width = (int(v) for v in rng.integers(20, 48, 2))
                smooth_image(rng, height, width).save(folder / f"img_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def one_per_class(tmp_path_factory) -> Path:
    """32 training images, each its own class: a label names a sample."""
    return make_tree(tmp_path_factory.mktemp("tree"), num_classes=32, per_class=1)


def loader(source, rank=0, world=1, micro=4, workers=0, **kwargs) -> StreamingLoader:
    train = kwargs.pop("train", True)
    transform = Transform(SIDE, train=train, seed=3)
    return StreamingLoader(source, transform, micro, rank, world, num_workers=workers, **kwargs)


def test_every_sample_once_over_two_ranks_and_the_same_crops_as_one_rank(one_per_class):
    data = open_streaming("imagenet", str(one_per_class), SIDE)
    assert data.num_classes == 32 and len(data.train) == 32
    ranks = [list(loader(data.train, rank=r, world=2, workers=1)) for r in range(2)]
    seen = torch.cat([labels for share in ranks for _, labels in share])
    assert sorted(seen.tolist()) == list(range(32))  # every sample exactly once
    # Global micro batch i of (micro 4 x 2 ranks) is micro batch i of (micro 8 x 1 rank), images
    # included: a sample's crop does not depend on the rank that decodes it.
    single = list(loader(data.train, micro=8, world=1, workers=0))
    for i, (images, labels) in enumerate(single):
        joined_images = torch.cat([ranks[0][i][0], ranks[1][i][0]])
        joined_labels = torch.cat([ranks[0][i][1], ranks[1][i][1]])
        assert torch.equal(labels, joined_labels) and torch.equal(images, joined_images)
    # Evaluation pads instead of dropping: every test sample once, padding labelled -100.
    evals = [
        loader(data.test, rank=r, world=2, micro=5, train=False, shuffle=False, drop_last=False)
        for r in range(2)
    ]
    labels = torch.cat([l for e in evals for _, l in e])
    assert sorted(labels[labels >= 0].tolist()) == list(range(32))


def test_an_uneven_plan_streams_every_sample_of_a_step_once_with_the_same_crops(one_per_class):
    # 15 samples per step over 2 ranks x 2 accumulation: micro batches of 4, 4, 4 and 3.
    data = open_streaming("imagenet", str(one_per_class), SIDE)
    plan = plan_batches(15, 4, 2)
    split = {"grad_accum_steps": plan.grad_accum_steps, "global_batch_size": 15}
    ranks = [
        list(loader(data.train, rank=r, world=2, micro=plan.micro_batch_size, workers=1, **split))
        for r in range(2)
    ]
    for rank, share in enumerate(ranks):
        assert [len(labels) for _, labels in share] == plan.rank_micro_batch_sizes(rank) * 2
    single = list(loader(data.train, micro=15, world=1, workers=0))  # one micro batch per step
    for step, (images, labels) in enumerate(single):
        mine = [batch for share in ranks for batch in share[2 * step : 2 * step + 2]]
        order = torch.cat([l for _, l in mine]).argsort()
        assert torch.equal(torch.cat([l for _, l in mine])[order], labels.sort().values)
        joined = torch.cat([x for x, _ in mine])[order]
        assert torch.equal(joined, images[labels.argsort()])


def test_resume_mid_epoch_with_two_workers_gives_the_same_batches_bitwise(one_per_class):
    data = open_streaming("imagenet", str(one_per_class), SIDE)
    reference = loader(data.train, micro=4, workers=2, seed=5)
    reference.set_epoch(1)
    expected = list(reference)
    interrupted = loader(data.train, micro=4, workers=2, seed=5)
    interrupted.set_epoch(1)
    batches = iter(interrupted)
    for _ in range(3):
        next(batches)
    state = interrupted.state_dict()
    resumed = loader(data.train, micro=4, workers=2, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    rest = list(resumed)
    assert len(rest) == len(expected) - 3
    for (xa, ya), (xb, yb) in zip(expected[3:], rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # The global torch RNG (dropout, a resumed run's restored state) is not touched by iterating.
    before = torch.get_rng_state()
    list(loader(data.train, micro=4, workers=1))
    assert torch.equal(torch.get_rng_state(), before)
    # Another epoch draws other crops (the epoch is part of each sample's seed).
    other = loader(data.train, micro=4, workers=0, seed=5)
    assert not torch.equal(next(iter(other))[0], expected[0][0])


class RecordingTransform(Transform):
    """Notes which process decoded each sample of each epoch (in a file: workers are processes)."""

    def __init__(self, log: Path) -> None:
        super().__init__(SIDE, train=True, seed=3)
        self.log = log

    def __call__(self, data: bytes, epoch: int, index: int) -> torch.Tensor:
        with open(self.log, "a") as file:
            file.write(f"{epoch} {os.getpid()}\n")
        return super().__call__(data, epoch, index)


def test_workers_persist_across_epochs_and_a_pass_cut_short_continues_exactly(
    one_per_class, tmp_path
):
    data = open_streaming("imagenet", str(one_per_class), SIDE)
    log = tmp_path / "decoders.txt"
    kept = StreamingLoader(data.train, RecordingTransform(log), 4, 0, 1, seed=5, num_workers=2)

    def fresh(epoch: int) -> list:
        reference = loader(data.train, micro=4, workers=0, seed=5)
        reference.set_epoch(epoch)
        return list(reference)

    def same(a: list, b: list) -> bool:
        return len(a) == len(b) and all(
            torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b, strict=True)
        )

    assert same(list(kept), fresh(0))
    kept.set_epoch(1)
    batches = iter(kept)
    for _ in range(3):
        next(batches)  # cut short: the workers have decoded ahead
    kept.start_at(3)
    assert same(list(kept), fresh(1)[3:])
    kept.set_epoch(2)
    assert same(list(kept), fresh(2))
    decoders: dict[int, set[int]] = {}
    for line in log.read_text().split("\n")[:-1]:
        epoch, pid = map(int, line.split())
        decoders.setdefault(epoch, set()).add(pid)
    # The same two worker processes decoded every epoch (none of them is this process).
    assert decoders[0] == decoders[1] == decoders[2] and len(decoders[0]) == 2
    assert os.getpid() not in decoders[0]


def test_the_epoch_changes_the_crops_of_the_same_samples(one_per_class):
    """Without shuffling, epochs 0 and 1 decode the same samples in the same order: their images
    differ only if the epoch is part of the augmentation seed; the same epoch decodes identically."""
    data = open_streaming("imagenet", str(one_per_class), SIDE)

    def epoch_batches(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        unshuffled = loader(data.train, micro=8, workers=0, shuffle=False, seed=5)
        unshuffled.set_epoch(epoch)
        images, labels = zip(*unshuffled, strict=True)
        return torch.cat(images), torch.cat(labels)

    first, second, first_again = epoch_batches(0), epoch_batches(1), epoch_batches(0)
    assert first[1].tolist() == second[1].tolist() == list(range(32))  # the same samples
    assert torch.equal(first[0], first_again[0]) and torch.equal(first[1], first_again[1])
    differing = sum(not torch.equal(a, b) for a, b in zip(first[0], second[0], strict=True))
    assert differing >= 28, f"only {differing} of 32 samples got other crops in another epoch"


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_grayscale_cmyk_and_png_named_jpeg_decode_to_rgb(tmp_path):
    gray = encode(Image.new("L", (40, 30), 90), "JPEG", quality=95)
    cmyk_image = Image.new("CMYK", (40, 30), (0, 200, 200, 0))
    cmyk = encode(cmyk_image, "JPEG", quality=95)
    png = encode(Image.new("RGB", (40, 30), (10, 200, 30)), "PNG")
    box = (0, 0, 40, 30)
    for data, expected, tolerance in (
        (gray, (90, 90, 90), 2),
        (cmyk, cmyk_image.convert("RGB").getpixel((0, 0)), 3),
        (png, (10, 200, 30), 0),  # lossless: exact
    ):
        out = decode_crop(data, box, 8)
        assert out.shape == (3, 8, 8) and out.dtype == torch.uint8
        colour = out.double().mean(dim=(1, 2))
        assert torch.allclose(colour, torch.tensor(expected).double(), atol=tolerance), colour
    # The PNG saved under a .JPEG name reads through a tree like any other file.
    folder = tmp_path / "train" / "n0"
    folder.mkdir(parents=True)
    (folder / "x.JPEG").write_bytes(png)
    (tmp_path / "val" / "n0").mkdir(parents=True)
    (tmp_path / "val" / "n0" / "y.JPEG").write_bytes(cmyk)
    data = open_streaming("imagenet", str(tmp_path), 8)
    images, _ = next(iter(loader(data.test, micro=1, train=False, shuffle=False, drop_last=False)))
    assert images.shape == (1, 3, SIDE, SIDE)


def test_bad_image_policy_error_names_the_file_skip_replaces_and_counts(tmp_path, capsys):
    root = make_tree(tmp_path, num_classes=8, per_class=1)
    victim = root / "train" / "n0003" / "img_0.JPEG"
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])  # truncated
    data = open_streaming("imagenet", str(root), SIDE)
    with pytest.raises(DataError, match=r"n0003/img_0\.JPEG"):
        list(loader(data.train, micro=8, workers=1, shuffle=False))
    skipping = loader(data.train, micro=8, workers=1, shuffle=False, bad_images="skip")
    [(images, labels)] = list(skipping)
    # Sample 3 is replaced by sample 4 (label, crop and all); nothing else changes.
    assert labels.tolist() == [0, 1, 2, 4, 4, 5, 6, 7]
    assert torch.equal(images[3], images[4])
    assert skipping.skipped_images == 1 and skipping.state_dict()["skipped_images"] == 1
    assert "n0003/img_0.JPEG" in capsys.readouterr().err


def test_save_to_disk_dataset_with_an_image_column_streams(tmp_path):
    rng = np.random.default_rng(1)
    images = [smooth_image(rng, 24, 32) for _ in range(10)]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}
    )
    split = {"image": images, "label": [i % 3 for i in range(10)]}
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(split, features=features),
            "validation": datasets.Dataset.from_dict(split, features=features).select(range(4)),
        }
    ).save_to_disk(str(saved))
    data = open_streaming("imagenet", str(saved), SIDE)
    assert data.num_classes == 3 and len(data.train) == 10 and len(data.test) == 4
    batches = list(loader(data.train, micro=5, workers=1, shuffle=False))
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 0, 1], [2, 0, 1, 2, 0]]
    assert batches[0][0].shape == (5, 3, SIDE, SIDE)
    # The first image's crop is the decode of its own bytes with its own seed.
    expected = Transform(SIDE, train=True, seed=3)(encode(images[0], "PNG"), 0, 0)
    assert torch.equal(batches[0][0][0], expected)


def write_config(path: Path, output_dir: Path, data: dict) -> Path:
    config = {
        "run": {"output_dir": str(output_dir), "trackers": [], "progress_bar": False},
        "data": {"name": "imagenet", "image_size": SIDE, "num_workers": 0, **data},
        "model": {"name": "digits_cnn"},
        "batch": {"global_batch_size": 8, "micro_batch_size": 4},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("problem", ["no_root", "no_val", "no_train"])
def test_missing_root_or_split_is_one_config_line_exit_2_nothing_written(tmp_path, problem, capsys):
    root = tmp_path / "imagenet"
    if problem != "no_root":
        make_tree(root, num_classes=2, per_class=2)
        victim = root / ("val" if problem == "no_val" else "train")
        for file in victim.rglob("*.JPEG"):
            file.unlink()
        for folder in sorted(victim.rglob("*"), reverse=True):
            folder.rmdir()
        victim.rmdir()
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", out, {"path": str(root)})
    # In process (the command line's own main): a subprocess costs ~20 s of imports here.
    assert train_main(["--config", str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: data.path:"), lines
    assert ("no such directory" if problem == "no_root" else problem[3:]) in lines[0]
    assert not out.exists()


def test_streaming_keys_are_refused_where_they_would_be_ignored(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.num_workers"):
        load_config(write_config(tmp_path / "a.yaml", tmp_path, {"name": "cifar10"}))
    with pytest.raises(ConfigError, match=r"data\.crop_padding"):
        load_config(write_config(tmp_path / "b.yaml", tmp_path, {"crop_padding": 2}))
    # A resolved config (every key written, defaults included) loads back.
    config = load_config(write_config(tmp_path / "c.yaml", tmp_path, {}))
    (tmp_path / "resolved.yaml").write_text(config.to_yaml())
    assert load_config(tmp_path / "resolved.yaml") == config


def test_poly_warmup_zero_is_the_old_schedule_and_warms_up_linearly_otherwise(tmp_path):
    base = load_config(REPO / "configs" / "imagenet_resnet50_lars.yaml")
    no_warmup = base.schedule.model_copy(update={"warmup_epochs": 0.0})
    old = build.lr_schedule(no_warmup, 2.0, 10, 100)
    for step in range(0, 101, 7):
        assert old(step) == 2.0 * schedules.polynomial_decay(step, 100, 2.0, no_warmup.min_lr_ratio)
    warm = build.lr_schedule(base.schedule.model_copy(update={"warmup_epochs": 2.0}), 2.0, 10, 100)
    assert [warm(s) for s in (0, 9, 19)] == [2.0 / 20, 2.0 / 2, 2.0]
    assert warm(20) == 2.0 * schedules.polynomial_decay(0, 80, 2.0, base.schedule.min_lr_ratio)
    assert warm(60) < warm(40) < warm(20)


IMAGENET_TRAIN = 1_281_167


class LabelsOnly:
    """ImageNet's size and labels, no file: everything is built, nothing is read."""

    labels = np.arange(IMAGENET_TRAIN, dtype=np.int64) % 1000

    def __len__(self) -> int:
        return IMAGENET_TRAIN

    def read(self, index: int) -> bytes:
        raise AssertionError("a recipe check must not read data")


@pytest.mark.parametrize("name", ["lars", "tvlars", "lamb"])
def test_imagenet_recipes_build_everything_short_of_reading_data(name):
    config = load_config(REPO / "configs" / f"imagenet_resnet50_{name}.yaml")
    assert config.data.streams() and config.batch.global_batch_size == 32768
    assert config.task.label_smoothing == 0.1
    plan = plan_batches(32768, config.batch.micro_batch_size, 16 * 8)  # the comment's 16 x 8 GPUs
    assert plan.grad_accum_steps == 2
    train = StreamingLoader(
        LabelsOnly(),
        Transform(224, train=True, seed=config.run.seed, crop_scale=tuple(config.data.crop_scale)),
        plan.micro_batch_size,
        5,
        plan.world_size,
        grad_accum_steps=plan.grad_accum_steps,
        num_workers=config.data.num_workers,
    )
    steps_per_epoch = len(train) // plan.grad_accum_steps
    assert steps_per_epoch == IMAGENET_TRAIN // 32768
    streamed = type(
        "Data",
        (),
        {
            "num_classes": 1000,
            "in_chans": 3,
            "image_size": 224,
            "mean": (0.5,) * 3,
            "std": (0.25,) * 3,
            "augmented_in_loader": True,
        },
    )
    task = build_task(config, streamed, rank=0)
    assert task.train_augment.crop_padding == 0 and not task.train_augment.flip
    with torch.device("meta"):
        model = task.build_model()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # ResNet-50
    optimizer = build.optimizer(config.optim, model, build.peak_lr(config, plan), steps_per_epoch)
    assert type(optimizer).__name__.lower().startswith(name)
    lr_at = build.lr_schedule(config.schedule, config.optim.lr, steps_per_epoch, 40 * 39)
    assert lr_at(0) <= config.optim.lr


def test_imagenet_barlow_twins_recipe_builds_everything_short_of_reading_data():
    config = load_config(REPO / "configs" / "imagenet_resnet50_barlow_twins.yaml")
    assert config.data.streams() and config.batch.global_batch_size == 32768
    assert config.task.exact_accumulation and config.checkpoint.resume == "auto"
    plan = plan_batches(32768, config.batch.micro_batch_size, 16 * 8)  # the comment's 16 x 8 GPUs
    assert plan.grad_accum_steps == 2 and plan.even
    data = StreamingData(LabelsOnly(), LabelsOnly(), 1000, 224, "imagenet")
    train, _ = build._streaming_loaders(
        data, plan, "cpu", 5, config.run.seed, config.data, None, "barlow_twins"
    )
    assert isinstance(train.transform, TwoViewTransform)
    recipe = train.transform.cfg  # the paper's 23 px blur at 224, the config's crops and flips
    assert (recipe.blur_kernel_size, recipe.crop_scale, recipe.flip_prob) == (23, (0.08, 1.0), 0.5)
    steps_per_epoch = len(train) // plan.grad_accum_steps
    assert steps_per_epoch == IMAGENET_TRAIN // 32768
    task = build_task(config, data, rank=0)
    assert task.augment.cfg.blur_kernel_size == 23
    with torch.device("meta"):
        model = task.build_model()
    widths = [2048, *config.task.projector_dims]
    projector = sum(a * b for a, b in itertools.pairwise(widths)) + 2 * sum(widths[1:-1])
    assert sum(p.numel() for p in model.parameters()) == 25_557_032 - 2_049_000 + projector
    optimizer = build.optimizer(config.optim, model, build.peak_lr(config, plan), steps_per_epoch)
    assert type(optimizer).__name__ == "TVLARS" and optimizer.defaults["lmbda"] == 1e-5
    assert build.lr_schedule(config.schedule, 19.0, steps_per_epoch, 39_000)(20_000) == 19.0
