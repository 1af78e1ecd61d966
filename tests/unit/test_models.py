"""Model factory: timm by name, CIFAR stem, the paper's init, SyncBatchNorm, digits_cnn."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from tvlars_scale.models import ModelError, build_model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet18_cifar_stem_keeps_full_resolution_into_the_first_stage():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10)  # image_size 32: CIFAR stem by default
    assert isinstance(model.maxpool, nn.Identity)
    stem = model.conv1
    assert (stem.kernel_size, stem.stride, stem.padding) == ((3, 3), (1, 1), (1, 1))
    # torchvision's ImageNet ResNet-18 with the 7x7x3x64 stem conv swapped for a 3x3x3x64 one.
    imagenet_stem = torchvision.models.resnet18(num_classes=10)
    assert num_params(model) == num_params(imagenet_stem) - 64 * 3 * 7 * 7 + 64 * 3 * 3 * 3
    first_stage = model.layer1(model.act1(model.bn1(model.conv1(torch.randn(2, 3, 32, 32)))))
    assert first_stage.shape == (2, 64, 32, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_stem_choice_follows_image_size_and_is_refused_for_non_resnets():
    assert build_model("resnet18", 10, image_size=224).conv1.kernel_size == (7, 7)
    assert build_model("resnet34", 200, image_size=64).conv1.kernel_size == (3, 3)
    assert build_model("resnet18", 10, image_size=32, cifar_stem=False).conv1.stride == (2, 2)
    with pytest.raises(ModelError, match="'digits_cnn' is not"):
        build_model("digits_cnn", 10, in_chans=1, image_size=8, cifar_stem=True)


def test_unknown_model_and_init_are_named_in_the_error():
    with pytest.raises(ModelError, match="unknown model 'resnet_nope'"):
        build_model("resnet_nope", 10)
    with pytest.raises(ModelError, match="unknown init 'xavier'"):
        build_model("resnet18", 10, init="xavier")


def test_kaiming_uniform_init_draws_every_conv_from_the_fan_in_bound():
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            bound = math.sqrt(6 / fan_in)  # gain sqrt(2) * sqrt(3 / fan_in)
            assert module.weight.abs().max() <= bound, name
            if module.weight.numel() > 30_000:  # enough draws for a 3% check of the spread
                std = module.weight.std().item()
                assert std == pytest.approx(bound / math.sqrt(3), rel=0.03), name
    assert torch.equal(model.layer1[0].bn2.weight, torch.ones(64))
    # timm's own init zeroes each block's last BatchNorm: "timm" keeps it, the paper's does not.
    assert torch.equal(
        build_model("resnet18", 10, init="timm").layer1[0].bn2.weight, torch.zeros(64)
    )


def test_sync_batchnorm_replaces_every_batchnorm():
    plain = build_model("resnet18", 10)
    synced = build_model("resnet18", 10, sync_batchnorm=True)
    num_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert num_bn == 20
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == num_bn
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())


def test_fixed_input_size_models_get_the_image_size():
    model = build_model("vit_tiny_patch16_224", 10, image_size=32)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_digits_cnn_is_a_timm_model_without_batch_statistics():
    assert timm.is_model("digits_cnn")
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, in_chans=1, image_size=8)
    images, labels = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    # The gradient of the whole batch is the mean of its micro batches' gradients: nothing in
    # the model couples the samples of a batch.
    F.cross_entropy(model(images), labels).backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for chunk in range(4):
        part = slice(8 * chunk, 8 * (chunk + 1))
        (F.cross_entropy(model(images[part]), labels[part]) / 4).backward()
    for full, accumulated in zip(whole, model.parameters(), strict=True):
        torch.testing.assert_close(accumulated.grad, full, rtol=1e-4, atol=1e-6)
    model.reset_classifier(0)
    assert model(images).shape == (32, model.num_features)
