"""Linear evaluation: frozen features in eval mode, a linear classifier, top-1 accuracy."""

import torch
from torch import nn

from tvlars_scale.tasks.linear_eval import LinearEvalSettings, extract_features, linear_evaluation


def test_separable_features_are_classified_and_chance_features_are_not():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=gen)
    centres = torch.randn(4, 16, generator=gen) * 3
    features = centres[labels] + 0.5 * torch.randn(400, 16, generator=gen)
    settings = LinearEvalSettings(epochs=20, batch_size=64)
    separable = linear_evaluation(features[:300], labels[:300], features[300:], labels[300:], 4,
                                  settings)  # fmt: skip
    assert separable["linear_test_accuracy"] == 1.0
    noise = torch.randn(400, 16, generator=gen)
    global_rng = torch.get_rng_state()
    chance = linear_evaluation(noise[:300], labels[:300], noise[300:], labels[300:], 4, settings)
    assert chance["linear_test_accuracy"] < 0.5
    assert torch.equal(torch.get_rng_state(), global_rng)  # evaluation leaves training's RNG alone


def test_extract_features_uses_eval_mode_and_restores_training_mode():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5))
    backbone.train()
    images = torch.randint(0, 256, (10, 3, 2, 2), dtype=torch.uint8)
    running_mean = backbone[2].running_mean.clone()
    features = extract_features(backbone, images, lambda x: x.float() / 255, batch_size=4)
    assert backbone.training
    torch.testing.assert_close(backbone[2].running_mean, running_mean)  # no statistics update
    backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(features, backbone(images.float() / 255))
