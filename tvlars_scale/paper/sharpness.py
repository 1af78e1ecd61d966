"""Sharpness of a solution: the largest eigenvalue of the training loss's Hessian.

The paper argues that warm-up-free large-batch training lands in sharp minimisers (its Section 3,
after Keskar et al. 2017) but never measures sharpness. This measures it: power iteration on
Hessian-vector products, each an exact double backward through autograd (no finite differences),
so the Hessian itself (parameters squared) is never formed::

    value = top_hessian_eigenvalue(lambda: loss_of(model), list(model.parameters()))

Power iteration converges to the eigenvalue of largest *magnitude*; at a minimum the Hessian is
(nearly) positive semi-definite, so that is the largest eigenvalue, the usual sharpness measure
(lambda_max; Cohen et al. 2021 "edge of stability" compare it with 2 / lr).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Eigen:
    value: float
    """The Rayleigh quotient v^T H v of the last (unit) iterate."""
    iterations: int
    """Hessian-vector products evaluated."""
    converged: bool
    """The relative change of the estimate fell below ``rtol``."""


def hessian_vector_product(
    loss_fn: Callable[[], Tensor], params: list[Tensor], vector: list[Tensor]
) -> list[Tensor]:
    """``H v`` of ``loss_fn()`` at ``params`` by double backward (``loss_fn`` must be deterministic)."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vector, strict=True))
    return [h.detach() for h in torch.autograd.grad(dot, params)]


def _norm(vector: list[Tensor]) -> Tensor:
    return torch.sqrt(sum((v * v).sum() for v in vector))


def top_hessian_eigenvalue(
    loss_fn: Callable[[], Tensor],
    params: list[Tensor],
    *,
    max_iterations: int = 20,
    rtol: float = 1e-3,
    seed: int = 0,
) -> Eigen:
    """Power iteration for the largest-magnitude eigenvalue of the Hessian of ``loss_fn()``.

    ``loss_fn`` is called once per iteration and must return the same function of ``params`` each
    time (fixed data, fixed augmentation, dropout off). The start vector is Gaussian from ``seed``
    (its own generator: the global RNG is left untouched). Stops when the estimate changes by less
    than ``rtol`` relatively, or after ``max_iterations`` products.
    """
    params = [p for p in params if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    norm = _norm(vector)
    vector = [v / norm for v in vector]
    value, converged, iterations = 0.0, False, 0
    for iterations in range(1, max_iterations + 1):
        product = hessian_vector_product(loss_fn, params, vector)
        # host sync: the estimate decides when to stop (once per Hessian-vector product).
        estimate = float(sum((h * v).sum() for h, v in zip(product, vector, strict=True)))
        norm = _norm(product)
        if float(norm) == 0.0:  # host sync: a zero Hessian along v (e.g. a linear loss)
            return Eigen(0.0, iterations, True)
        vector = [h / norm for h in product]
        if iterations > 1 and abs(estimate - value) <= rtol * abs(estimate):
            value, converged = estimate, True
            break
        value = estimate
    return Eigen(value, iterations, converged)
