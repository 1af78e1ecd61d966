"""Two real processes (gloo): the Barlow Twins cross-correlation, loss and gradients reduced across
ranks equal those of one process holding the concatenated batch."""

import copy

import pytest
import torch
import torch.distributed as dist
from multiproc import WORLD_SIZE, run_ranks
from torch import nn

from tvlars_scale.tasks.barlow_twins import (
    BarlowTwinsModel,
    barlow_twins_loss,
    cross_correlation,
    gradient_cache_step,
)

pytestmark = pytest.mark.distributed

NUM_SAMPLES = 24  # global micro-batch; each rank holds half


def make_inputs():
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(NUM_SAMPLES, 6, generator=gen) * 2 + 0.5
    x2 = x1 + 0.4 * torch.randn(NUM_SAMPLES, 6, generator=gen)
    torch.manual_seed(1)
    backbone = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
    return x1, x2, BarlowTwinsModel(backbone, feature_dim=16, projector_dims=(8,))  # no BN


def average_grads_like_ddp(model: nn.Module) -> list[torch.Tensor]:
    grads = []
    for p in model.parameters():
        g = p.grad.clone()
        # collective: all_reduce(SUM) then / world size, what DDP and DeepSpeed do with gradients
        dist.all_reduce(g)
        grads.append(g / WORLD_SIZE)
    return grads


def worker() -> dict:
    rank = dist.get_rank()
    x1, x2, model = make_inputs()
    mine = slice(rank * NUM_SAMPLES // 2, (rank + 1) * NUM_SAMPLES // 2)
    x1, x2 = x1[mine], x2[mine]
    results = {}

    results["corr"] = cross_correlation(*model(x1, x2)).detach()

    loss = barlow_twins_loss(*model(x1, x2))
    loss.backward()
    results["loss"] = loss.detach()
    results["grads"] = average_grads_like_ddp(model)

    # Exact accumulation across ranks: 2 micro-batches per rank, effective batch = all 24 samples.
    exact = copy.deepcopy(model)
    exact.zero_grad()
    micro = list(zip(x1.split(6), x2.split(6), strict=True))
    results["exact_loss"] = gradient_cache_step(
        exact, micro, barlow_twins_loss, lambda surrogate: surrogate.backward()
    )
    results["exact_grads"] = average_grads_like_ddp(exact)
    return results


def test_two_ranks_equal_one_process_on_concatenated_batch():
    per_rank = run_ranks(worker)
    x1, x2, model = make_inputs()
    want_corr = cross_correlation(*model(x1, x2)).detach()
    want_loss = barlow_twins_loss(*model(x1, x2))
    want_loss.backward()
    want_grads = [p.grad for p in model.parameters()]

    for got in per_rank:
        torch.testing.assert_close(got["corr"], want_corr, rtol=1e-5, atol=1e-6)
        for key in ("loss", "exact_loss"):
            torch.testing.assert_close(got[key], want_loss.detach(), rtol=1e-5, atol=1e-6)
        for key in ("grads", "exact_grads"):
            for g, w in zip(got[key], want_grads, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
