"""Barlow Twins' two views of streamed samples: cut in the decode workers from the (seed, epoch,
index) generator, one decode per sample, the photometric part applied on the device as
torchvision's per-image ops would."""

from __future__ import annotations

import io
import multiprocessing

import numpy as np
import pytest
import torch
from PIL import Image
from test_streaming import make_tree, smooth_image
from torchvision.transforms.v2 import functional as TF

from tvlars_scale.config import load_config
from tvlars_scale.data import StreamingData, StreamingLoader, Transform, open_streaming
from tvlars_scale.data import decode as decode_module
from tvlars_scale.data.decode import decode_crop, decode_crops, random_resized_crop
from tvlars_scale.data.ssl_decode import TwoViewTransform
from tvlars_scale.data.ssl_views import (
    PHOTOMETRIC_PARAMS,
    DecodedViews,
    SSLAugmentConfig,
    TwoViewAugment,
    barlow_twins_recipe,
    draw_photometric,
)
from tvlars_scale.tasks.barlow_twins import BarlowTwinsTask

SIDE, SEED = 16, 7
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return open_streaming(
        "imagenet", str(make_tree(tmp_path_factory.mktemp("t"), 5, 4)), SIDE
    ).train


def recipe() -> SSLAugmentConfig:
    return barlow_twins_recipe(SIDE, MEAN, STD, crop_scale=(0.25, 1.0))


def replayed(data: bytes, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views of (SEED, epoch, index), drawn step by step as the module docstring says."""
    cfg = recipe()
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    rng = np.random.default_rng([SEED, epoch, index])
    crops, params = [], []
    for view in cfg.views:
        box = random_resized_crop(width, height, rng, cfg.crop_scale, cfg.crop_ratio)
        crops.append((box, rng.random() < cfg.flip_prob))
        params.append(draw_photometric(rng, cfg, view))
    return torch.stack(decode_crops(data, crops, SIDE)), torch.from_numpy(np.stack(params))


def test_streamed_views_are_the_decode_of_seed_epoch_index_and_resume_mid_epoch(source):
    # Rank 1 of 2, global 10 = 2 rounds of 5 split 3 + 2: an uneven plan, two workers.
    def loader() -> StreamingLoader:
        transform = TwoViewTransform(recipe(), seed=SEED)
        return StreamingLoader(
            source, transform, 3, 1, 2, seed=SEED, grad_accum_steps=2, global_batch_size=10,
            num_workers=2,
        )  # fmt: skip

    first = loader()
    for epoch in (0, 1):
        first.set_epoch(epoch)
        order, _, bounds = first.rank_order()
        batches = list(first)
        assert [len(labels) for _, labels in batches] == [2, 2, 2, 2]
        for k, (views, labels) in enumerate(batches):
            assert isinstance(views, DecodedViews) and views.crops.dtype == torch.uint8
            assert views.crops.shape == (len(labels), 2, 3, SIDE, SIDE)
            assert views.params.shape == (len(labels), 2, len(PHOTOMETRIC_PARAMS))
            for slot, index in enumerate(order[bounds[k] : bounds[k + 1]].tolist()):
                crops, params = replayed(source.read(index), epoch, index)
                assert torch.equal(views.crops[slot], crops) and torch.equal(
                    views.params[slot], params
                )
                assert labels[slot] == source.labels[index]
                assert not torch.equal(crops[0], crops[1])  # two different views
        if epoch == 0:
            epoch0 = batches
    assert not torch.equal(epoch0[0][0].crops, batches[0][0].crops)  # new epoch, new views

    resumed = loader()
    resumed.load_state_dict({**first.state_dict(), "epoch": 0, "position": 2})
    for (views, labels), (want, want_labels) in zip(list(resumed), epoch0[2:], strict=True):
        assert torch.equal(views.crops, want.crops) and torch.equal(views.params, want.params)
        assert torch.equal(labels, want_labels)


def test_two_crops_share_one_decode_and_equal_single_crops_at_the_same_scale(monkeypatch):
    buffer = io.BytesIO()
    smooth_image(np.random.default_rng(1), 160, 200).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    boxes = [((10, 20, 64, 72), False), ((90, 30, 80, 64), True)]  # both decode at 1/2 for 32 px
    decodes = []
    original = decode_module._decode_rgb
    monkeypatch.setattr(decode_module, "_decode_rgb", lambda *a: decodes.append(a) or original(*a))
    both = decode_crops(data, boxes, 32)
    assert len(decodes) == 1
    for got, (box, flip) in zip(both, boxes, strict=True):
        assert torch.equal(got, decode_crop(data, box, 32, flip=flip))


def test_worker_draws_follow_the_recipes_probabilities():
    cfg = barlow_twins_recipe(64, MEAN, STD)
    rng = np.random.default_rng(0)
    draws = {k: np.stack([draw_photometric(rng, cfg, v) for _ in range(4000)]) for k, v in
             enumerate(cfg.views)}  # fmt: skip
    column = {name: i for i, name in enumerate(PHOTOMETRIC_PARAMS)}
    for k, view in enumerate(cfg.views):
        p = draws[k]
        jittered = p[:, column["brightness"]] != 1.0
        assert jittered.mean() == pytest.approx(cfg.jitter_prob, abs=0.03)
        assert np.all(p[~jittered][:, column["hue"]] == 0.0)
        assert p[:, column["brightness"]].min() >= 1 - cfg.brightness
        assert np.abs(p[:, column["hue"]]).max() <= cfg.hue
        assert p[:, column["grayscale"]].mean() == pytest.approx(cfg.grayscale_prob, abs=0.03)
        assert p[:, column["blur"]].mean() == pytest.approx(view.blur_prob, abs=0.03)
        assert p[:, column["solarize"]].mean() == pytest.approx(view.solarize_prob, abs=0.03)
        sigma = p[:, column["blur_sigma"]]
        assert cfg.blur_sigma[0] <= sigma.min() and sigma.max() <= cfg.blur_sigma[1]


def test_device_side_applies_the_parameters_as_torchvision_per_image():
    cfg = SSLAugmentConfig(size=SIDE, mean=MEAN, std=STD, blur_kernel_size=5)
    crops = torch.randint(0, 256, (4, 2, 3, SIDE, SIDE), dtype=torch.uint8)
    # Rows: brightness, contrast, saturation, hue, grayscale, blur_sigma, blur, solarize.
    params = torch.tensor(
        [
            [[1.0, 1.0, 1.0, 0.0, 0, 1.0, 0, 0], [1.3, 0.7, 1.2, 0.05, 0, 0.5, 1, 1]],
            [[0.8, 1.2, 0.9, -0.1, 1, 1.5, 1, 0], [1.0, 1.0, 1.0, 0.0, 1, 0.2, 0, 1]],
            [[1.1, 0.9, 0.6, 0.08, 0, 2.0, 1, 0], [0.7, 1.3, 1.0, -0.02, 0, 0.9, 0, 0]],
            [[1.0, 1.0, 1.0, 0.0, 1, 0.3, 0, 0], [1.2, 1.1, 0.8, 0.1, 1, 1.1, 1, 1]],
        ]
    )
    views = TwoViewAugment(cfg)(DecodedViews(crops, params))
    for k, (view, recipe) in enumerate(zip(views, cfg.views, strict=True)):
        for i in range(len(crops)):
            b, c, s, h, gray, sigma, blur, solarize = params[i, k].tolist()
            want = TF.adjust_brightness(crops[i, k].float() / 255, b)
            want = TF.adjust_saturation(TF.adjust_contrast(want, c), s)
            want = TF.adjust_hue(want, h)
            if gray:
                want = TF.rgb_to_grayscale(want, num_output_channels=3)
            if blur and recipe.blur_prob:
                want = TF.gaussian_blur(want, [5, 5], [sigma, sigma])
            if solarize and recipe.solarize_prob:
                want = TF.solarize(want, cfg.solarize_threshold)
            want = TF.normalize(want, list(MEAN), list(STD))
            torch.testing.assert_close(view[i], want, atol=2e-4, rtol=0)


def test_streamed_evaluation_features_follow_the_split_and_leave_no_worker_behind(source):
    config = load_config(
        "configs/digits.yaml",
        ["data.name=imagenet", "data.crop_padding=4", "data.num_workers=2", "task.name=barlow_twins",
         "task.projector_dims=[8]", "batch.micro_batch_size=3"],
    )  # fmt: skip
    data = StreamingData(source, source, 5, SIDE, "imagenet")
    task = BarlowTwinsTask(config, data, rank=0)
    model = task.build_model().eval()
    before = multiprocessing.active_children()
    with torch.no_grad():
        features, labels = task._training_split_features(model, torch.device("cpu"))
        assert features.shape == (len(source), model.backbone.num_features)
        assert torch.equal(labels, torch.from_numpy(source.labels))  # the split's order
        centre = Transform(SIDE, train=False)
        for index in (0, len(source) - 1):
            image = centre(source.read(index), 0, index).unsqueeze(0)
            torch.testing.assert_close(features[index], model(task.eval_transform(image))[0])
    assert multiprocessing.active_children() == before  # the workers stopped with the loader
