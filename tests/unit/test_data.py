"""Data sources, rank-sharded micro batches with exact resume, and whole-batch augmentation."""

from __future__ import annotations

import itertools

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from tvlars_scale.batching import plan_batches
from tvlars_scale.data import (
    PAD_LABEL,
    BatchAugment,
    DataError,
    MicroBatchLoader,
    load_image_data,
)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No network in tests: hub requests fail at once; caches go to tmp_path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def random_rgb(rng: np.random.Generator, num: int, side: int) -> np.ndarray:
    return rng.integers(0, 256, (num, side, side, 3), dtype=np.uint8)


# ---------------------------------------------------------------- sources


def test_digits_is_sklearn_digits_scaled_to_uint8_with_a_fixed_stratified_split():
    data = load_image_data("digits")
    assert data.train_images.shape == (1437, 1, 8, 8) and data.test_images.shape == (360, 1, 8, 8)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert data.num_classes == 10 and data.in_chans == 1 and data.image_size == 8
    for labels in (data.train_labels, data.test_labels):
        assert set(labels.tolist()) == set(range(10))
    # Together the splits are exactly sklearn's images (as 0..16 counts) with their labels.
    raw = load_digits()
    expected = sorted(
        (tuple(image.ravel().astype(int)), int(label))
        for image, label in zip(raw.images, raw.target, strict=True)
    )
    images = torch.cat([data.train_images, data.test_images]).flatten(1)
    labels = torch.cat([data.train_labels, data.test_labels])
    counts = (images.double() * 16 / 255).round().int()
    got = sorted(
        (tuple(row.tolist()), int(label)) for row, label in zip(counts, labels, strict=True)
    )
    assert got == expected
    assert int(images.max()) == 255  # 16 maps to full scale
    again = load_image_data("digits", seed=123)  # the split does not move with the run seed
    assert torch.equal(again.test_images, data.test_images)
    pixels = data.train_images.double() / 255
    assert data.mean[0] == pytest.approx(pixels.mean().item(), rel=1e-9)
    assert data.std[0] == pytest.approx(pixels.std(unbiased=False).item(), rel=1e-9)


def test_digits_resized_and_synthetic_follow_size_and_seed():
    assert load_image_data("digits", image_size=16).train_images.shape == (1437, 1, 16, 16)
    first = load_image_data("synthetic", num_synthetic=50, image_size=12, seed=1)
    assert first.train_images.shape == (50, 3, 12, 12) and first.test_images.shape == (5, 3, 12, 12)
    assert torch.equal(first.train_images, load_image_data("synthetic", 50, 50, 12, 1).train_images)
    other = load_image_data("synthetic", num_synthetic=50, image_size=12, seed=2)
    assert not torch.equal(first.train_images, other.train_images)


def test_cifar10_from_a_save_to_disk_directory(tmp_path, offline_hub):
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(10)])}
    )
    arrays = {"train": random_rgb(rng, 12, 32), "test": random_rgb(rng, 4, 32)}
    labels = {"train": rng.integers(0, 10, 12).tolist(), "test": [3, 1, 4, 1]}
    splits = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"img": [Image.fromarray(a) for a in arrays[split]], "label": labels[split]},
                features=features,
            )
            for split in arrays
        }
    )
    splits.save_to_disk(str(tmp_path / "cifar10"))
    data = load_image_data("cifar10", path=str(tmp_path / "cifar10"))
    # PNG is lossless: the decoded tensors are the arrays, channels first.
    assert torch.equal(data.train_images, torch.from_numpy(arrays["train"]).permute(0, 3, 1, 2))
    assert torch.equal(data.test_images, torch.from_numpy(arrays["test"]).permute(0, 3, 1, 2))
    assert data.train_labels.tolist() == labels["train"] and data.test_labels.tolist() == [
        3,
        1,
        4,
        1,
    ]
    assert data.num_classes == 10 and len(data.mean) == 3


def test_tiny_imagenet_from_an_image_folder_converts_grayscale_and_resizes(tmp_path, offline_hub):
    rng = np.random.default_rng(1)
    root = tmp_path / "tiny-imagenet"
    wnids = ["n01443537", "n01629819"]
    expected = {}
    for split in ("train", "valid"):
        for label, wnid in enumerate(wnids):
            (root / split / wnid).mkdir(parents=True)
            rgb = random_rgb(rng, 1, 64)[0]
            gray = rng.integers(0, 256, (64, 64), dtype=np.uint8)
            Image.fromarray(rgb).save(root / split / wnid / "a.png")
            Image.fromarray(gray).save(root / split / wnid / "b.png")
            Image.fromarray(random_rgb(rng, 1, 80)[0]).save(root / split / wnid / "c.png")
            expected[split, label] = (rgb, np.repeat(gray[:, :, None], 3, axis=2))
    data = load_image_data("tiny-imagenet", path=str(root))
    assert data.train_images.shape == (6, 3, 64, 64) and data.test_images.shape == (6, 3, 64, 64)
    assert data.num_classes == 2 and sorted(data.test_labels.tolist()) == [0, 0, 0, 1, 1, 1]
    for split, images, labels in (
        ("train", data.train_images, data.train_labels),
        ("valid", data.test_images, data.test_labels),
    ):
        decoded = [image.permute(1, 2, 0).numpy() for image in images]
        for label in (0, 1):
            mine = [d for d, y in zip(decoded, labels.tolist(), strict=True) if y == label]
            for want in expected[split, label]:  # the RGB one, and the grayscale one as RGB
                assert any(np.array_equal(want, d) for d in mine)
    smaller = load_image_data("tiny-imagenet", path=str(root), image_size=32)
    assert smaller.train_images.shape == (6, 3, 32, 32)


def test_unreachable_sources_fail_fast_with_one_line_naming_them(tmp_path, offline_hub):
    missing = str(tmp_path / "no_such_dir")
    with pytest.raises(DataError, match="no_such_dir") as error:
        load_image_data("cifar10", path=missing)
    assert "\n" not in str(error.value)
    with pytest.raises(DataError, match="zh-plus/tiny-imagenet") as error:
        load_image_data("tiny-imagenet")  # the default hub id, unreachable offline
    assert "\n" not in str(error.value)
    only_train = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(
            {
                "img": [Image.fromarray(random_rgb(np.random.default_rng(2), 1, 32)[0])],
                "label": [0],
            },
            features=datasets.Features(
                {"img": datasets.Image(), "label": datasets.ClassLabel(names=["a"])}
            ),
        )
    )
    only_train.save_to_disk(str(tmp_path / "only_train"))
    with pytest.raises(DataError, match=r"no test split.*splits: train"):
        load_image_data("cifar10", path=str(tmp_path / "only_train"))
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_image_data("mnist")


# ---------------------------------------------------------------- loader


def identified(num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose only pixel and label both hold the sample's index (mod 256 for the pixel)."""
    labels = torch.arange(num)
    return (labels % 256).to(torch.uint8).view(num, 1, 1, 1), labels


def rank_batches(loader: MicroBatchLoader) -> list[list[int]]:
    return [labels.tolist() for _, labels in loader]


def test_ranks_get_disjoint_equal_shares_that_cover_all_but_a_short_tail():
    num, micro, world = 103, 4, 3
    images, labels = identified(num)
    shares = [rank_batches(MicroBatchLoader(images, labels, micro, r, world)) for r in range(world)]
    assert {len(share) for share in shares} == {num // (micro * world)}  # 8 micro batches each
    seen = [i for share in shares for batch in share for i in batch]
    assert len(seen) == len(set(seen)) == 8 * micro * world
    assert num - len(seen) < micro * world  # only the tail that does not fill a batch is left out
    first_images, first_labels = next(iter(MicroBatchLoader(images, labels, micro, 0, world)))
    assert torch.equal(first_images.flatten(), (first_labels % 256).to(torch.uint8))


def test_global_micro_batches_do_not_depend_on_the_world_size_split():
    images, labels = identified(96)
    whole = rank_batches(MicroBatchLoader(images, labels, 12, 0, 1, seed=5))
    split = [rank_batches(MicroBatchLoader(images, labels, 4, r, 3, seed=5)) for r in range(3)]
    for step, batch in enumerate(whole):
        assert sorted(batch) == sorted(i for share in split for i in share[step])


@pytest.mark.parametrize(("global_batch", "micro", "world"), [(26, 4, 3), (20, 8, 3), (24, 4, 3)])
def test_uneven_plans_use_every_sample_of_each_step_once(global_batch, micro, world):
    images, labels = identified(83)
    plan = plan_batches(global_batch, micro, world)
    loaders = [
        MicroBatchLoader(
            images,
            labels,
            plan.micro_batch_size,
            rank,
            world,
            seed=4,
            grad_accum_steps=plan.grad_accum_steps,
            global_batch_size=global_batch,
        )
        for rank in range(world)
    ]
    shares = [rank_batches(loader) for loader in loaders]
    steps = 83 // global_batch
    for rank, share in enumerate(shares):
        assert [len(b) for b in share] == plan.rank_micro_batch_sizes(rank) * steps
    # Step s is the window [s G, (s + 1) G) of the epoch's permutation, whatever the world size.
    whole = rank_batches(MicroBatchLoader(images, labels, global_batch, 0, 1, seed=4))
    accum = plan.grad_accum_steps
    for step in range(steps):
        taken = [i for share in shares for b in share[step * accum : (step + 1) * accum] for i in b]
        assert sorted(taken) == sorted(whole[step])


def test_an_uneven_run_resumes_at_another_world_size_where_it_stopped():
    images, labels = identified(90)
    three = [
        MicroBatchLoader(images, labels, 4, r, 3, seed=2, grad_accum_steps=2, global_batch_size=22)
        for r in range(3)
    ]
    for loader in three:
        list(itertools.islice(loader, 2))  # one optimizer step of 22
    two = [
        MicroBatchLoader(images, labels, 6, r, 2, seed=2, grad_accum_steps=2, global_batch_size=22)
        for r in range(2)
    ]
    for loader in two:
        loader.load_state_dict(three[0].state_dict())
        assert loader.position == 2
    rest_three = [rank_batches(loader) for loader in three]
    rest_two = [rank_batches(loader) for loader in two]
    for step in range(len(rest_two[0]) // 2):
        window = slice(2 * step, 2 * step + 2)
        assert sorted(i for share in rest_two for b in share[window] for i in b) == sorted(
            i for share in rest_three for b in share[window] for i in b
        )
    three[0].start_at(1)
    with pytest.raises(ValueError, match="inside an optimizer step of 2"):
        two[0].load_state_dict(three[0].state_dict())


def test_epochs_reshuffle_reproducibly_and_accumulation_trims_to_whole_steps():
    images, labels = identified(50)
    loader = MicroBatchLoader(images, labels, 4, 0, 1, seed=3, grad_accum_steps=3)
    assert len(loader) == 12  # 50 // (4 * 3) = 4 steps of 3 micro batches
    epoch0 = rank_batches(loader)
    loader.set_epoch(1)
    epoch1 = rank_batches(loader)
    assert epoch0 != epoch1 and list(itertools.chain(*epoch0)) != list(range(48))
    again = MicroBatchLoader(images, labels, 4, 0, 1, seed=3, grad_accum_steps=3)
    again.set_epoch(1)
    assert rank_batches(again) == epoch1
    in_order = MicroBatchLoader(images, labels, 4, 0, 1, shuffle=False)
    assert list(itertools.chain(*rank_batches(in_order))) == list(range(48))
    with pytest.raises(ValueError, match="do not fill one optimizer step of 60"):
        MicroBatchLoader(images, labels, 10, 0, 2, grad_accum_steps=3)


def test_evaluation_pads_every_rank_to_full_batches_with_pad_labels():
    num, micro, world = 23, 4, 2
    images, labels = identified(num)
    shares = [
        rank_batches(MicroBatchLoader(images, labels, micro, r, world, False, drop_last=False))
        for r in range(world)
    ]
    assert all(len(share) == 3 and all(len(b) == micro for b in share) for share in shares)
    seen = [i for share in shares for batch in share for i in batch]
    assert sorted(i for i in seen if i != PAD_LABEL) == list(range(num))
    assert seen.count(PAD_LABEL) == 3 * micro * world - num


def test_resume_continues_with_exactly_the_batches_not_yet_consumed():
    images, labels = identified(64)
    reference = MicroBatchLoader(images, labels, 4, 1, 2, seed=7)
    reference.set_epoch(2)
    uninterrupted = rank_batches(reference)
    interrupted = MicroBatchLoader(images, labels, 4, 1, 2, seed=7)
    interrupted.set_epoch(2)
    consumed = [labels.tolist() for _, labels in itertools.islice(interrupted, 3)]
    state = interrupted.state_dict()
    assert (state["epoch"], state["position"]) == (2, 3)
    resumed = MicroBatchLoader(images, labels, 4, 1, 2, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the training loop's call for the current epoch keeps the position
    assert consumed + rank_batches(resumed) == uninterrupted
    resumed.set_epoch(3)
    assert len(rank_batches(resumed)) == len(resumed)


def test_resume_under_another_split_of_the_same_global_micro_batch():
    images, labels = identified(64)
    two_ranks = [MicroBatchLoader(images, labels, 4, r, 2, seed=1) for r in range(2)]
    for loader in two_ranks:
        list(itertools.islice(loader, 2))
    saved = two_ranks[0].state_dict()
    one_rank = MicroBatchLoader(images, labels, 8, 0, 1, seed=1)
    one_rank.load_state_dict(saved)
    rest_two = [rank_batches(loader) for loader in two_ranks]
    for step, batch in enumerate(rank_batches(one_rank)):
        assert sorted(batch) == sorted(rest_two[0][step] + rest_two[1][step])
    # A global micro batch of another size (16 x 1 rank): the position converts through samples.
    larger = MicroBatchLoader(images, labels, 16, 0, 1, seed=1)
    larger.load_state_dict(saved)
    rest = sorted(sample for batch in rank_batches(larger) for sample in batch)
    assert rest == sorted(sample for share in rest_two for batch in share for sample in batch)
    mismatched = MicroBatchLoader(images, labels, 8, 0, 1, seed=2)
    with pytest.raises(ValueError, match="seed=1"):
        mismatched.load_state_dict(saved)


# ---------------------------------------------------------------- augmentation


def normalised(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    return (images.double() / 255 - mean_t) / std_t


def test_evaluation_only_normalises():
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    out = BatchAugment(mean, std, train=False)(images)
    assert out.dtype == torch.float32 and out.shape == images.shape
    torch.testing.assert_close(out.double(), normalised(images, mean, std), atol=1e-5, rtol=0)


def find_window(padded: np.ndarray, crop: np.ndarray) -> list[tuple[int, int, bool]]:
    """Every (y, x, flipped) whose window of ``padded`` ([C, H+2p, W+2p]) equals ``crop``."""
    side = crop.shape[-1]
    hits = []
    for y, x in itertools.product(range(padded.shape[1] - side + 1), repeat=2):
        window = padded[:, y : y + side, x : x + side]
        hits += [
            (y, x, flip)
            for flip in (False, True)
            if np.array_equal(window[..., ::-1] if flip else window, crop)
        ]
    return hits


def test_crops_are_shifted_windows_of_the_zero_padded_image_and_half_are_mirrored():
    pad = 4
    images = torch.randint(0, 256, (256, 3, 16, 16), dtype=torch.uint8)
    augment = BatchAugment((0.0,) * 3, (1.0,) * 3, crop_padding=pad, seed=11)
    crops = (augment(images) * 255).round().to(torch.uint8).numpy()
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    found = [find_window(padded[b], crops[b]) for b in range(len(images))]
    assert all(len(hits) == 1 for hits in found)  # random content: exactly one window matches
    offsets = {(y, x) for ((y, x, _),) in found}
    assert len(offsets) > 40  # of 81 possible
    assert 0.35 < np.mean([flip for ((_, _, flip),) in found]) < 0.65


def test_flip_mirrors_left_right_and_no_padding_no_flip_is_identity():
    images = torch.randint(0, 256, (64, 1, 6, 6), dtype=torch.uint8)
    flipped = BatchAugment((0.0,), (1.0,), crop_padding=0, seed=0).crop_and_flip(images)
    mirrored = (flipped == images.flip(-1)).flatten(1).all(dim=1)
    unchanged = (flipped == images).flatten(1).all(dim=1)
    assert torch.all(mirrored ^ unchanged) and 10 < int(mirrored.sum()) < 54
    plain = BatchAugment((0.0,), (1.0,), crop_padding=0, flip=False)(images)
    torch.testing.assert_close(
        plain.double(), normalised(images, (0.0,), (1.0,)), atol=1e-6, rtol=0
    )


def test_augmentation_is_reproducible_under_a_seed_and_resumable():
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    stats = ((0.5,) * 3, (0.25,) * 3)
    first, same = BatchAugment(*stats, seed=4), BatchAugment(*stats, seed=4)
    assert torch.equal(first(images), same(images))
    assert not torch.equal(
        BatchAugment(*stats, seed=5)(images), BatchAugment(*stats, seed=4)(images)
    )
    state = first.state_dict()
    upcoming = [first(images) for _ in range(2)]
    resumed = BatchAugment(*stats, seed=99)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed(images), want) for want in upcoming)
    with pytest.raises(ValueError, match="uint8"):
        first(images.float())


class _Recorder(torch.nn.Module):
    """A classifier that keeps the (augmented) batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.fc(x.flatten(1))


def test_each_rank_draws_its_own_crops_and_flips():
    """The classification task augments on the device from a generator per rank: the same batch
    is cropped and flipped differently on ranks 0 and 1, and identically by two rank-0 tasks."""
    from tvlars_scale.config import Config
    from tvlars_scale.tasks import build_task

    config = Config.model_validate({"data": {"name": "digits", "crop_padding": 2, "flip": True}})
    data = load_image_data("digits")
    images, labels = data.train_images[:64], data.train_labels[:64]
    seen = []
    for rank in (0, 1, 0):
        model = _Recorder()
        build_task(config, data, rank).training_loss(model, images, labels)
        seen.append(model.seen)
    assert torch.equal(seen[0], seen[2])
    differing = int((seen[0] != seen[1]).flatten(1).any(dim=1).sum())
    assert differing > 48, f"ranks 0 and 1 augmented only {differing} of 64 images differently"
