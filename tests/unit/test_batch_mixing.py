"""Mixup / CutMix against timm's own functions, and the per-sample RandAugment / TrivialAugment:
every draw reproducible from (seed, rank, count) or (seed, epoch, sample index)."""

from __future__ import annotations

import numpy as np
import pytest
import timm.data.mixup as timm_mixup
import torch
from timm.data.mixup import Mixup, cutmix_bbox_and_lam, mixup_target
from timm.loss import SoftTargetCrossEntropy

from tvlars_scale.config import Config
from tvlars_scale.data import MicroBatchLoader
from tvlars_scale.data import mixing as mixing_module
from tvlars_scale.data.mixing import BatchMix, cutmix_box
from tvlars_scale.data.policies import SampleAugment
from tvlars_scale.data.types import ImageData
from tvlars_scale.tasks.classification import ClassificationTask

NUM_CLASSES = 10


class _LegacyRng:
    """The ``integers`` of a numpy Generator, drawn as NumPy's global RandomState would draw them:
    seeded alike, our box and timm's ``rand_bbox`` take the same centres."""

    def __init__(self, seed: int):
        self.state = np.random.RandomState(seed)

    def integers(self, low: int, high: int) -> int:
        return self.state.randint(low, high)


@pytest.mark.parametrize("shape", [(8, 8), (32, 24), (7, 13)])
def test_cutmix_box_is_timms_for_the_same_centre(shape):
    for seed, lam in enumerate([0.05, 0.3, 0.5, 0.77, 0.99]):
        np.random.seed(seed)
        timm_box, timm_lam = cutmix_bbox_and_lam(shape, lam)
        box, corrected = cutmix_box(*shape, lam, _LegacyRng(seed))
        assert box == tuple(int(v) for v in timm_box)
        assert corrected == timm_lam


def _recording(monkeypatch, mix: BatchMix) -> list:
    """Record what ``mix`` draws: (lam, use_cutmix) and, for CutMix, the box."""
    drawn: list = []
    draw = mix.draw

    def recorded_draw(rng):
        drawn.append(draw(rng))
        return drawn[-1]

    def recorded_box(*args):
        drawn.append(cutmix_box(*args))
        return drawn[-1]

    monkeypatch.setattr(mix, "draw", recorded_draw)
    monkeypatch.setattr(mixing_module, "cutmix_box", recorded_box)
    return drawn


@pytest.mark.parametrize("cutmix", [False, True], ids=["mixup", "cutmix"])
def test_mixing_equals_timms_for_the_same_lambda_and_box(monkeypatch, cutmix):
    """Odd batch (timm's batch mode pairs the middle sample with itself) and label smoothing."""
    alphas = {"cutmix_alpha": 1.0} if cutmix else {"mixup_alpha": 0.4}
    mix = BatchMix(NUM_CLASSES, **alphas, label_smoothing=0.1, seed=3, rank=1)
    drawn = _recording(monkeypatch, mix)
    images = torch.randn(7, 3, 16, 12)
    labels = torch.randint(0, NUM_CLASSES, (7,))
    mixed, targets = mix(images.clone(), labels)

    (lam, use_cutmix), *box = drawn
    assert use_cutmix == cutmix and 0 < lam < 1
    reference = Mixup(**alphas, label_smoothing=0.1, num_classes=NUM_CLASSES)
    monkeypatch.setattr(reference, "_params_per_batch", lambda: (lam, use_cutmix))
    if cutmix:
        monkeypatch.setattr(timm_mixup, "rand_bbox", lambda *args, **kwargs: box[0][0])
    expected = images.clone()
    timm_lam = reference._mix_batch(expected)
    assert torch.equal(mixed, expected)
    assert torch.equal(targets, mixup_target(labels, NUM_CLASSES, timm_lam, 0.1))
    assert not torch.equal(mixed, images)


def test_mixing_is_reproducible_from_seed_rank_and_count():
    images, labels = torch.randn(6, 1, 8, 8), torch.arange(6)

    def run(mix: BatchMix, times: int) -> list[torch.Tensor]:
        return [mix(images.clone(), labels)[1] for _ in range(times)]

    settings = {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "seed": 5}
    first = run(BatchMix(NUM_CLASSES, **settings), 6)
    assert all(
        torch.equal(a, b)
        for a, b in zip(first, run(BatchMix(NUM_CLASSES, **settings), 6), strict=True)
    )
    assert len({tuple(t.flatten().tolist()) for t in first}) == 6  # each micro batch draws anew
    # A generator restored from the state after 4 micro batches draws the 5th and 6th alike.
    resumed = BatchMix(NUM_CLASSES, **settings)
    resumed.load_state_dict({"num_mixed": 4})
    assert all(torch.equal(a, b) for a, b in zip(first[4:], run(resumed, 2), strict=True))
    other_rank = run(BatchMix(NUM_CLASSES, **settings, rank=1), 6)
    assert not all(torch.equal(a, b) for a, b in zip(first, other_rank, strict=True))


def test_mixing_off_for_a_batch_leaves_it_and_smooths_the_targets():
    mix = BatchMix(NUM_CLASSES, mixup_alpha=1.0, prob=0.0, label_smoothing=0.2)
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    mixed, targets = mix(images.clone(), labels)
    assert torch.equal(mixed, images)
    assert torch.equal(targets, mixup_target(labels, NUM_CLASSES, 1.0, 0.2))


def _digits_like(num: int = 16) -> ImageData:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (num, 1, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.arange(num) % NUM_CLASSES
    return ImageData(images, labels, images, labels, NUM_CLASSES, (0.5,), (0.25,), "digits")


def test_classification_task_trains_on_timms_soft_target_loss():
    data = _digits_like()
    config = Config.model_validate(
        {"data": {"cutmix_alpha": 1.0, "mixup_alpha": 0.5, "crop_padding": 0, "flip": False}}
    )
    task = ClassificationTask(config, data, rank=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, NUM_CLASSES))
    loss = task.training_loss(model, data.train_images, data.train_labels)
    replay = BatchMix(NUM_CLASSES, mixup_alpha=0.5, cutmix_alpha=1.0)
    images, targets = replay(task.train_augment(data.train_images), data.train_labels)
    assert torch.equal(loss, SoftTargetCrossEntropy()(model(images), targets))
    assert task.state_dict()["mix"] == {"num_mixed": 1}


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_sample_augment_depends_on_seed_epoch_and_index_only(policy):
    augment = SampleAugment(policy)
    images = _digits_like(12).train_images
    indices = torch.arange(12)
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    out = augment.batch(images, seed=0, epoch=0, indices=indices)
    assert torch.equal(torch.get_rng_state(), global_state)  # torch's generator is untouched
    # The same samples in another order and batch: the same augmentation per sample.
    order = torch.tensor([7, 3, 11])
    assert torch.equal(augment.batch(images[order], 0, 0, order), out[order])
    one = augment(images[5], np.random.default_rng([0, 0, 5]))
    assert torch.equal(one, out[5])
    assert not torch.equal(augment.batch(images, 0, 1, indices), out)  # another epoch draws anew
    assert not torch.equal(out, images)


def test_in_memory_loader_augments_each_sample_from_its_index():
    data = _digits_like(16)
    augment = SampleAugment("randaugment")

    def epoch_batches(world_size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        loader = MicroBatchLoader(
            data.train_images,
            torch.arange(16),  # labels = sample indices, to find each sample
            micro_batch_size=4,
            rank=rank,
            world_size=world_size,
            seed=9,
            sample_augment=augment,
        )
        loader.set_epoch(2)
        batches = list(loader)
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    images, indices = epoch_batches(1, 0)
    assert torch.equal(images, augment.batch(data.train_images[indices], 9, 2, indices))
    # Two ranks see the same augmentation of each sample they take.
    for rank in range(2):
        rank_images, rank_indices = epoch_batches(2, rank)
        position = {int(i): k for k, i in enumerate(indices)}
        assert torch.equal(rank_images, images[[position[int(i)] for i in rank_indices]])


def test_streamed_samples_are_augmented_in_the_transform_from_seed_epoch_and_index():
    import io
    import pickle

    from PIL import Image

    from tvlars_scale.data import Transform

    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    data = buffer.getvalue()
    augmented = Transform(16, train=True, seed=1, augment=SampleAugment("randaugment"))
    plain = Transform(16, train=True, seed=1)
    in_worker = pickle.loads(pickle.dumps(augmented))  # what a decode worker holds
    samples = [(epoch, index) for epoch in (0, 3) for index in (0, 5, 9)]
    outputs = [augmented(data, *sample) for sample in samples]
    for output, sample in zip(outputs, samples, strict=True):
        assert torch.equal(output, in_worker(data, *sample)) and output.shape == (3, 16, 16)
    assert any(not torch.equal(o, plain(data, *s)) for o, s in zip(outputs, samples, strict=True))
    assert len({tuple(o.flatten().tolist()) for o in outputs}) == len(samples)
