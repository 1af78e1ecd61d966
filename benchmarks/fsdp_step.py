"""FSDP2 rows of benchmarks/sharded_step.py: the optimizer step on one ``fully_shard`` model.

Three optimizers step the same FSDP2 resnet (DTensor ``Shard(0)`` parameters, the usual two
parameter groups), interleaved step by step:

* ``sgd``: the named baseline, ``torch.optim.SGD(momentum=0.9, nesterov=True)`` on the DTensors
  (torch's foreach implementation through DTensor dispatch, as FSDP2 users run it);
* ``tvlars``: :class:`~tvlars_scale.optim.TVLARS` bound with ``bind_fsdp`` (local shards, one norm
  all-reduce per step);
* ``tvlars_dtensor``: the same TVLARS update written the way a user would on DTensors
  (:class:`PerParameterDTensorTVLARS`): ``torch.linalg.vector_norm`` per parameter, each norm a
  lazy partial sum that DTensor all-reduces when the trust ratio uses it.

Each ``step()`` is timed (the slower rank's time per step) and the collectives inside it counted by
``CommDebugMode`` (torch.distributed's and DTensor's functional ones alike); after the first step the
two TVLARS implementations' parameters are compared (they must agree to float rounding).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode

from tvlars_scale.optim import schedules

METHODS = ("sgd", "tvlars", "tvlars_dtensor")


class PerParameterDTensorTVLARS(torch.optim.Optimizer):
    """TVLARS (paper variant, the defaults of :class:`~tvlars_scale.optim.TVLARS`) written per
    parameter on DTensors: the design the issue compares against. Same arithmetic, same state."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=5e-4, eta=1e-3, lmbda=1e-4):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lmbda=lmbda)
        defaults.update(adapt=True, exclude_1d=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["momentum_buffer"] = torch.zeros_like(p)
                step = state["step"]
                phi = schedules.phi(step, group["lmbda"], 1.0, 0, 0.0)
                adapted = group["adapt"] and not (group["exclude_1d"] and p.dim() <= 1)
                d = p.grad + group["weight_decay"] * p if adapted else p.grad.clone()
                if adapted:
                    # collective: each norm is a partial sum over the shards, all-reduced by
                    # DTensor when the ratio is used -- two all-reduces per adapted parameter.
                    w_norm = torch.linalg.vector_norm(p)
                    d_norm = torch.linalg.vector_norm(d)
                    ratio = group["eta"] * w_norm / d_norm
                    trust = torch.where((w_norm > 0) & (d_norm > 0), ratio, 1.0)
                    neg_gamma = trust * (-group["lr"] * phi)
                else:
                    neg_gamma = -group["lr"] * phi
                d.mul_(neg_gamma)
                v = state["momentum_buffer"]
                v.mul_(group["momentum"]).add_(d)
                p.add_(d).add_(v, alpha=group["momentum"])
                state["step"] = step + 1


def build(model_name: str, method: str, template_state: dict):
    import timm
    from torch.distributed.fsdp import fully_shard

    from tvlars_scale.optim import TVLARS, bind_fsdp, layerwise_param_groups

    model = timm.create_model(model_name, num_classes=1000)
    model.load_state_dict(template_state)
    for child in model.children():  # one FSDP unit per top-level block, then the root
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child)
    fully_shard(model)
    groups = layerwise_param_groups(model, weight_decay=5e-4)
    if method == "sgd":
        optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True)
    elif method == "tvlars":
        optimizer = TVLARS(groups, lr=1.0)
        bind_fsdp(optimizer, model)
    else:
        optimizer = PerParameterDTensorTVLARS(groups, lr=1.0)
    return model, optimizer


def train_step(model, optimizer, images, labels) -> tuple[float, int]:
    import torch.nn.functional as F

    F.cross_entropy(model(images), labels).backward()
    with CommDebugMode() as comm:
        start = time.perf_counter()
        optimizer.step()
        seconds = time.perf_counter() - start
    optimizer.zero_grad(set_to_none=True)
    return seconds, comm.get_total_counts()


def run(args, template, images, labels) -> dict:
    """Per method: ``[(seconds, collectives)]`` per timed step, and the final parameters' worst
    relative difference between the two TVLARS implementations (both step the same batches)."""
    runs = {m: build(args.model, m, template.state_dict()) for m in METHODS}
    samples = {m: [] for m in METHODS}
    worst = None
    for step in range(args.warmup_steps + args.steps):
        for method in METHODS:  # interleaved: the same machine state for all
            sample = train_step(*runs[method], images, labels)
            if step >= args.warmup_steps:
                samples[method].append(sample)
        if worst is None:
            # After the first step (later ones amplify rounding: resnet18 at LR 1 on noise is
            # chaotic), the two TVLARS implementations must agree to float rounding.
            worst = max_relative_difference(runs["tvlars"][0], runs["tvlars_dtensor"][0])
    return {"samples": samples, "tvlars_vs_dtensor": worst, "rank": dist.get_rank()}


def max_relative_difference(model_a, model_b) -> float:
    worst = 0.0
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        # collective: two all-gathers per parameter, outside the timed steps
        full_a, full_b = a.detach().full_tensor(), b.detach().full_tensor()
        worst = max(worst, float((full_a - full_b).norm() / full_b.norm().clamp_min(1e-30)))
    return worst
