"""Linear evaluation of a frozen backbone: features once, then a linear classifier, top-1 accuracy.

The protocol of the paper (Appendix A, after Barlow Twins): the pretrained backbone is frozen and a
linear classifier on its features is trained with SGD and cosine annealing (100 epochs by default);
the reported number is top-1 accuracy on the test split.

The backbone is frozen, in eval mode and without augmentation, so its features are a fixed function
of the image: they are computed ONCE per split and the classifier trains on the cached feature
matrix (a ResNet forward per sample instead of one per sample per epoch: 100x less backbone compute
for the default 100 epochs). The price is that the linear stage sees no augmentation (the Barlow
Twins paper's linear protocol uses random crops); features are standardised with the training
split's statistics, an invertible affine map that makes one SGD learning rate fit every backbone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LinearEvalSettings",
    "extract_features",
    "linear_evaluation",
    "top1_accuracy",
    "train_linear_classifier",
]


@dataclass(frozen=True)
class LinearEvalSettings:
    epochs: int = 100
    """Passes of the linear classifier over the training features."""
    batch_size: int = 256
    lr: float = 0.1
    """Peak SGD learning rate, annealed to 0 with a cosine over all steps."""
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    """Seeds the classifier's init and the feature order: every rank trains the same classifier."""


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: Tensor,
    preprocess: Callable[[Tensor], Tensor],
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> Tensor:
    """Features of ``images`` (uint8 ``[N, C, H, W]``, any device) in eval mode, float32 ``[N, F]``."""
    device = torch.device(device) if device is not None else images.device
    was_training = backbone.training
    backbone.eval()
    try:
        chunks = [
            backbone(preprocess(images[start : start + batch_size].to(device))).float()
            for start in range(0, len(images), batch_size)
        ]
    finally:
        backbone.train(was_training)
    return torch.cat(chunks)


def train_linear_classifier(
    features: Tensor, labels: Tensor, num_classes: int, settings: LinearEvalSettings
) -> nn.Module:
    """SGD + cosine annealing on standardised features; returns ``standardise -> Linear``."""
    generator = torch.Generator().manual_seed(settings.seed)
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    # skip_init + own generator: evaluating leaves the global RNG (dropout, resume) untouched.
    linear = nn.utils.skip_init(nn.Linear, features.shape[1], num_classes, device=features.device)
    with torch.no_grad():
        weight = torch.empty(linear.weight.shape).normal_(0.0, 0.01, generator=generator)
        linear.weight.copy_(weight)
        linear.bias.zero_()
    steps_per_epoch = math.ceil(len(features) / settings.batch_size)
    optimizer = torch.optim.SGD(
        linear.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=settings.epochs * steps_per_epoch
    )
    standardized = (features - mean) / std
    for _ in range(settings.epochs):
        order = torch.randperm(len(features), generator=generator).to(features.device)
        for batch in order.split(settings.batch_size):
            loss = F.cross_entropy(linear(standardized[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return _Standardized(linear, mean, std)


class _Standardized(nn.Module):
    def __init__(self, linear: nn.Linear, mean: Tensor, std: Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear((features - self.mean) / self.std)


@torch.no_grad()
def top1_accuracy(classifier: nn.Module, features: Tensor, labels: Tensor) -> float:
    correct = (classifier(features).argmax(1) == labels).sum()
    # host sync: one scalar per evaluation.
    return correct.item() / len(labels)


def linear_evaluation(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    settings: LinearEvalSettings = LinearEvalSettings(),
) -> dict[str, float]:
    """Train the linear classifier on the training features; top-1 on both splits."""
    with torch.enable_grad():
        classifier = train_linear_classifier(train_features, train_labels, num_classes, settings)
    return {
        "linear_train_accuracy": top1_accuracy(classifier, train_features, train_labels),
        "linear_test_accuracy": top1_accuracy(classifier, test_features, test_labels),
    }
