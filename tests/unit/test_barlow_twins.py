"""Barlow Twins loss against its definition; exact (Gradient Cache) accumulation against one big batch."""

import contextlib
import copy
import itertools

import pytest
import torch
from torch import nn

from tvlars_scale.tasks.barlow_twins import (
    BarlowTwinsModel,
    barlow_twins_loss,
    build_projector,
    gradient_cache_step,
)

OFF_DIAGONAL_WEIGHT = 0.0051


def reference_loss(z1: torch.Tensor, z2: torch.Tensor, weight: float) -> float:
    """The loss written out entry by entry from the paper's definition, in float64."""
    a, b = z1.double(), z2.double()
    num_samples, dim = a.shape
    a_hat = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + 1e-5)
    b_hat = (b - b.mean(0)) / torch.sqrt(b.var(0, unbiased=False) + 1e-5)
    loss = 0.0
    for i, j in itertools.product(range(dim), range(dim)):
        c_ij = sum(a_hat[n, i] * b_hat[n, j] for n in range(num_samples)) / num_samples
        loss += (1.0 - c_ij) ** 2 if i == j else weight * c_ij**2
    return float(loss)


def small_model(seed: int, dropout: float = 0.0) -> BarlowTwinsModel:
    """No batch statistics (MLP backbone, one-Linear projector): micro-batching cannot change it."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 16))
    return BarlowTwinsModel(backbone, feature_dim=16, projector_dims=(8,))


def views(num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(num_samples, 6, generator=gen)
    return base + 0.3 * torch.randn(base.shape, generator=gen), base * 1.5 + 0.2


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_loss_matches_definition():
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(12, 5, generator=gen) * 3 + 1
    z2 = 0.5 * z1 + torch.randn(12, 5, generator=gen)
    got = barlow_twins_loss(z1, z2, OFF_DIAGONAL_WEIGHT)
    assert got.item() == pytest.approx(reference_loss(z1, z2, OFF_DIAGONAL_WEIGHT), rel=1e-5)


def test_default_off_diagonal_weight_is_the_papers():
    gen = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(10, 4, generator=gen), torch.randn(10, 4, generator=gen)
    assert barlow_twins_loss(z1, z2).item() == pytest.approx(reference_loss(z1, z2, 0.0051), 1e-5)


def test_projector_layout():
    projector = build_projector(32, (64, 64, 128))
    kinds = [type(m).__name__ for m in projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    model = BarlowTwinsModel(nn.Flatten(), 32, (64, 64, 128))
    z1, z2 = model(torch.randn(4, 2, 16), torch.randn(4, 2, 16))
    assert z1.shape == z2.shape == (4, 128)
    assert model(torch.randn(4, 2, 16)).shape == (4, 32)  # one batch: backbone features


def big_batch_loss_and_grads(model, x1, x2):
    model.zero_grad()
    loss = barlow_twins_loss(*model(x1, x2))
    loss.backward()
    return loss.item(), grads_of(model)


def test_exact_accumulation_equals_one_big_batch_and_plain_does_not():
    x1, x2 = views(32, seed=2)
    model = small_model(seed=3)
    big_loss, big_grads = big_batch_loss_and_grads(model, x1, x2)

    micro_batches = list(zip(x1.split(8), x2.split(8), strict=True))
    exact_model = copy.deepcopy(model)
    exact_model.zero_grad()
    exact_loss = gradient_cache_step(
        exact_model, micro_batches, barlow_twins_loss, lambda surrogate: surrogate.backward()
    )
    assert exact_loss.item() == pytest.approx(big_loss, rel=1e-5)
    for got, want in zip(grads_of(exact_model), big_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    plain_model = copy.deepcopy(model)
    plain_model.zero_grad()
    plain_losses = []
    for view1, view2 in micro_batches:
        loss = barlow_twins_loss(*plain_model(view1, view2)) / len(micro_batches)
        loss.backward()
        plain_losses.append(loss.item())
    assert abs(sum(plain_losses) - big_loss) > 0.05 * big_loss
    worst = max(
        (g - w).abs().max().item() for g, w in zip(grads_of(plain_model), big_grads, strict=True)
    )
    assert worst > 1e-2


class RecordingEmbedder(nn.Module):
    """Wraps a model and records every output, to compare the first pass with the recompute."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.outputs: list[torch.Tensor] = []

    def forward(self, view1, view2):
        out = self.model(view1, view2)
        self.outputs.append(torch.cat(out).detach().clone())
        return out


def test_recompute_replays_dropout_masks():
    x1, x2 = views(24, seed=4)
    embedder = RecordingEmbedder(small_model(seed=5, dropout=0.5))
    micro_batches = list(zip(x1.split(8), x2.split(8), strict=True))
    gradient_cache_step(embedder, micro_batches, barlow_twins_loss, lambda s: s.backward())
    first_pass, recompute = embedder.outputs[:3], embedder.outputs[3:]
    assert len(recompute) == 3
    for a, b in zip(first_pass, recompute, strict=True):
        assert torch.equal(a, b)


def test_running_statistics_updated_once_per_micro_batch():
    torch.manual_seed(6)
    model = BarlowTwinsModel(nn.Linear(6, 8), feature_dim=8, projector_dims=(8, 4))  # one BN
    expected = copy.deepcopy(model)
    x1, x2 = views(16, seed=7)
    micro_batches = list(zip(x1.split(8), x2.split(8), strict=True))
    entered = []
    gradient_cache_step(
        model,
        micro_batches,
        barlow_twins_loss,
        lambda s: s.backward(),
        micro_batch_context=lambda: entered.append(1) or contextlib.nullcontext(),
    )
    assert len(entered) == len(micro_batches)
    with torch.no_grad():
        for view1, view2 in micro_batches:
            expected(view1, view2)
    bn, expected_bn = model.projector[1], expected.projector[1]
    torch.testing.assert_close(bn.running_mean, expected_bn.running_mean)
    torch.testing.assert_close(bn.running_var, expected_bn.running_var)
    assert bn.num_batches_tracked.item() == 4
