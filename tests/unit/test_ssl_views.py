"""Batched per-sample view augmentation against torchvision's one-image functional ops."""

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from tvlars_scale.data.ssl_views import (
    SSLAugmentConfig,
    TwoViewAugment,
    color_jitter,
    gaussian_blur,
    recipe_for_image_size,
    resized_crop_and_flip,
)


def images(n=6, channels=3, side=16, seed=0):
    return torch.rand(n, channels, side, side, generator=torch.Generator().manual_seed(seed))


def test_color_jitter_matches_torchvision_per_sample():
    x = images()
    brightness = torch.tensor([1.0, 1.3, 0.7, 1.1, 0.9, 1.2])
    contrast = torch.tensor([0.8, 1.0, 1.4, 0.6, 1.2, 1.0])
    saturation = torch.tensor([1.0, 0.9, 1.1, 1.2, 0.8, 0.0])
    hue = torch.tensor([0.0, 0.05, -0.1, 0.08, -0.03, 0.1])
    got = color_jitter(x, brightness, contrast, saturation, hue)
    for i in range(len(x)):
        want = TF.adjust_brightness(x[i], brightness[i].item())
        want = TF.adjust_contrast(want, contrast[i].item())
        want = TF.adjust_saturation(want, saturation[i].item())
        want = TF.adjust_hue(want, hue[i].item())
        torch.testing.assert_close(got[i], want, atol=2e-5, rtol=0)


def test_gaussian_blur_matches_torchvision_per_sample():
    x = images()
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.8])
    got = gaussian_blur(x, sigma, kernel_size=5)
    for i in range(len(x)):
        want = TF.gaussian_blur(x[i], [5, 5], [sigma[i].item()] * 2)
        torch.testing.assert_close(got[i], want, atol=2e-5, rtol=0)


def test_full_crop_is_identity_and_flip_mirrors():
    x = images()
    whole = dict(size=16, mean=(0.0,), std=(1.0,), crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    kept = resized_crop_and_flip(x, SSLAugmentConfig(**whole, flip_prob=0.0))
    torch.testing.assert_close(kept, x, atol=1e-6, rtol=0)
    mirrored = resized_crop_and_flip(x, SSLAugmentConfig(**whole, flip_prob=1.0))
    torch.testing.assert_close(mirrored, x.flip(-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("side,channels", [(32, 3), (64, 3), (8, 1)])
def test_views_are_random_per_sample_and_shaped(side, channels):
    same = torch.randint(0, 256, (1, channels, side, side), dtype=torch.uint8).expand(8, -1, -1, -1)
    recipe = recipe_for_image_size(side, (0.5,) * channels, (0.25,) * channels)
    first, second = TwoViewAugment(recipe, seed=1)(same)
    assert first.shape == second.shape == (8, channels, side, side)
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    # One image repeated: every sample's view must differ (a batch-wide draw would repeat it).
    flat = first.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(8) * 1e9).min() > 1e-3
    assert not torch.allclose(first, second)


def test_seed_and_state_dict_make_views_reproducible():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    recipe = recipe_for_image_size(32, (0.5,) * 3, (0.25,) * 3)
    first, resumed = TwoViewAugment(recipe, seed=3), TwoViewAugment(recipe, seed=4)
    first(x)
    resumed.load_state_dict(first.state_dict())
    a, b = first(x), resumed(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other = TwoViewAugment(recipe, seed=5)(x)
    assert not torch.equal(a[0], other[0])


def test_recipe_sizes():
    assert recipe_for_image_size(32, (0.5,), (0.2,)).blur_kernel_size == 0
    assert recipe_for_image_size(64, (0.5,), (0.2,)).blur_kernel_size == 7
    assert recipe_for_image_size(224, (0.5,), (0.2,)).blur_kernel_size == 23  # the paper recipe
