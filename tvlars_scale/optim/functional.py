"""The optimizers' math on lists of tensors, written once and run by two executors.

Each algorithm is split in two halves around the per-layer norm reduction:

* ``*_direction`` computes, from weights ``w`` and gradients ``g``, the update direction ``d`` and the
  tensors whose norm enters the trust ratio (its denominator);
* ``*_apply`` applies the update given one 0-dim tensor per tensor (derived by the optimizer from the
  per-layer trust ratios, so no value ever travels to the host) and Python-float scalars. It may
  overwrite ``d``, which is the optimizer's scratch, never the caller's gradient.

Every operation goes through an ``ops`` executor: :data:`FOREACH` calls ``torch._foreach_*`` (one
dispatch per list, fused multi-tensor kernels where the device has them), :data:`LOOP` runs the same
per-tensor op in Python. Both execute identical arithmetic in the same order, so the two paths agree;
on the CPU, where ``torch._foreach_*`` is itself a per-tensor loop, FOREACH takes the per-tensor form
wherever that moves fewer bytes, and both share :func:`sum_of_squares` for the norms.

Like ``torch.optim``'s functional forms, every helper takes its tensor lists positionally and the
executor and scalars by keyword.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

Tensors = list[torch.Tensor]


# Mean elements per tensor below which one multi-tensor call beats a Python loop of per-tensor ops
# (resnet50's 1-D parameters average ~500 elements; its conv weights ~400K).
SMALL_TENSOR_NUMEL = 1 << 14


def _small_tensors(xs: Tensors) -> bool:
    return sum(x.numel() for x in xs) < SMALL_TENSOR_NUMEL * len(xs)


def sum_of_squares(xs: Tensors) -> torch.Tensor:
    """``||x||^2`` of each tensor as one 1-D tensor, accumulated in float32 at least.

    Shared by both executors. On the CPU, for tensors of useful size, a BLAS dot of the flat tensor
    with itself runs at twice the speed of the norm reduction and is at least as accurate (measured on
    resnet50's layers, where the norms were a quarter of a layer-wise step). Like the sharded
    reduction's squares, it overflows float32 above norms of ~1.8e19.
    """
    if xs[0].device.type == "cpu" and not _small_tensors(xs):
        return torch.stack([_dot_with_itself(x) for x in xs])
    accumulate = functools.reduce(torch.promote_types, {x.dtype for x in xs}, torch.float32)
    return torch.stack(torch._foreach_norm(xs, 2, dtype=accumulate)).square()


def _dot_with_itself(x: torch.Tensor) -> torch.Tensor:
    if x.dtype in (torch.float32, torch.float64) and x.is_contiguous():
        flat = x.view(-1)
        return torch.dot(flat, flat)
    accumulate = torch.promote_types(x.dtype, torch.float32)
    return torch.linalg.vector_norm(x, dtype=accumulate).square()


def _loop_ops() -> SimpleNamespace:
    def add_(xs, ys, *, alpha=1.0):
        for x, y in zip(xs, ys, strict=True):
            x.add_(y, alpha=alpha)

    def add_scalar_(xs, scalar):
        for x in xs:
            x.add_(scalar)

    def mul_(xs, other):
        if isinstance(other, list):
            for x, y in zip(xs, other, strict=True):
                x.mul_(y)
        else:
            for x in xs:
                x.mul_(other)

    def copy_(xs, ys):
        for x, y in zip(xs, ys, strict=True):
            x.copy_(y)

    def add_into(out, xs, ys, *, alpha=1.0):
        for o, x, y in zip(out, xs, ys, strict=True):
            torch.add(x, y, alpha=alpha, out=o)

    def sqrt_(xs):
        for x in xs:
            x.sqrt_()

    def reciprocal_(xs):
        for x in xs:
            x.reciprocal_()

    def addcmul_(xs, ys, zs, *, value=1.0):
        for x, y, z in zip(xs, ys, zs, strict=True):
            x.addcmul_(y, z, value=value)

    return SimpleNamespace(
        **{
            f.__name__: f
            for f in (
                add_,
                add_into,
                add_scalar_,
                mul_,
                copy_,
                sqrt_,
                reciprocal_,
                addcmul_,
                sum_of_squares,
            )
        }
    )


def _foreach_add_into(out: Tensors, xs: Tensors, ys: Tensors, *, alpha: float = 1.0) -> None:
    if _small_tensors(xs):
        # Two multi-tensor calls instead of a Python loop; every sum exists before any is written,
        # so ``out`` may be ``ys``.
        torch._foreach_copy_(out, torch._foreach_add(xs, ys, alpha=alpha))
    else:
        # torch has no foreach op with out=: one add per tensor writes into ``out`` in one pass,
        # where copy_ + add_ would take two.
        LOOP.add_into(out, xs, ys, alpha=alpha)


def _foreach_mul_(xs: Tensors, other: Tensors | float) -> None:
    if not isinstance(other, list) and xs[0].device.type == "cpu":
        # On the CPU, torch._foreach_mul_ rounds a Python scalar to the tensors' dtype (beta1 = 0.9
        # becomes 0.8984375 in bf16) where Tensor.mul_ multiplies in fp32; its CPU kernel is a
        # per-tensor loop anyway, so the loop's op costs nothing and keeps the executors equal.
        LOOP.mul_(xs, other)
    else:
        torch._foreach_mul_(xs, other)


LOOP = _loop_ops()
FOREACH = SimpleNamespace(
    add_=torch._foreach_add_,
    add_into=_foreach_add_into,
    add_scalar_=torch._foreach_add_,
    mul_=_foreach_mul_,
    copy_=torch._foreach_copy_,
    sqrt_=torch._foreach_sqrt_,
    reciprocal_=torch._foreach_reciprocal_,
    addcmul_=torch._foreach_addcmul_,
    sum_of_squares=sum_of_squares,
)


def ratio_or_one(
    ratio: torch.Tensor, weight_norm: torch.Tensor, update_norm: torch.Tensor
) -> torch.Tensor:
    """The trust ratio where both norms are positive, else 1 (a zero or NaN norm leaves the step
    unscaled). ``torch.where``, not a Python branch: no host sync."""
    return torch.where(torch.minimum(weight_norm, update_norm) > 0, ratio, 1.0)


def decayed_gradient(w: Tensors, g: Tensors, *, ops, weight_decay: float, out: Tensors) -> Tensors:
    """``d = g + weight_decay * w`` written into ``out`` in one pass (the gradients stay untouched)."""
    if weight_decay == 0.0:
        ops.copy_(out, g)
    else:
        ops.add_into(out, g, w, alpha=weight_decay)
    return out


# --- TVLARS, paper variant (Algorithm 1) -------------------------------------------------------------
#   m_{t+1} = w_t - gamma_t d_t,   w_{t+1} = m_{t+1} + mu (m_{t+1} - m_t),   m_0 = w_0.
# With v_t = m_t - m_{t-1} (v_0 = 0, so w_t = m_t + mu v_t) this is exactly
#   v_{t+1} = mu v_t - gamma_t d_t,   w_{t+1} = w_t - gamma_t d_t + mu v_{t+1},
# which updates w and v in place: no copy of m, no swap of buffers, one buffer of state.


def tvlars_apply(
    w: Tensors, d: Tensors, velocity: Tensors, neg_gamma: Tensors, *, ops, momentum: float
) -> None:
    """One TVLARS step; ``d`` is scratch and is overwritten.

    Each op reads at most one tensor that is not already in cache: ``d`` was just written, and
    ``velocity`` is re-read right after it was written.
    """
    ops.mul_(d, neg_gamma)  # d <- -gamma d
    ops.add_into(velocity, d, velocity, alpha=momentum)  # v <- mu v - gamma d
    ops.add_(d, velocity, alpha=momentum)  # d <- -gamma d + mu v_{t+1}
    ops.add_(w, d)


# --- Heavy-ball momentum on a scaled direction (TVLARS official code, LARS) ---------------------------
#   buf = mu * buf + scale * d;   w -= lr * buf            (nesterov: w -= lr * (scale * d + mu * buf))


def heavy_ball_apply(
    w: Tensors,
    d: Tensors,
    buf: Tensors,
    scale: Tensors,
    *,
    ops,
    lr: float,
    momentum: float,
    nesterov: bool,
) -> None:
    """One heavy-ball step; ``d`` is scratch and is overwritten."""
    ops.mul_(d, scale)  # d <- scale d
    ops.add_into(buf, d, buf, alpha=momentum)  # buf <- mu buf + scale d
    if nesterov:
        ops.add_(d, buf, alpha=momentum)
        ops.add_(w, d, alpha=-lr)
    else:
        ops.add_(w, buf, alpha=-lr)


# --- LAMB (pytorch-optimizer semantics: no bias correction) -------------------------------------------


def lamb_direction(
    w: Tensors,
    g: Tensors,
    exp_avg: Tensors,
    exp_avg_sq: Tensors,
    *,
    ops,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    out: Tensors,
) -> Tensors:
    """Updates the Adam moments in place and writes ``adam_step + weight_decay * w`` into ``out``."""
    ops.mul_(exp_avg, beta1)
    ops.add_(exp_avg, g, alpha=1.0 - beta1)
    ops.mul_(exp_avg_sq, beta2)
    ops.addcmul_(exp_avg_sq, g, g, value=1.0 - beta2)
    ops.copy_(out, exp_avg_sq)
    ops.sqrt_(out)
    ops.add_scalar_(out, eps)
    ops.reciprocal_(out)
    ops.mul_(out, exp_avg)  # exp_avg / (sqrt(exp_avg_sq) + eps), in place: no temporary
    if weight_decay != 0.0:
        ops.add_(out, w, alpha=weight_decay)
    return out


def scaled_apply(w: Tensors, d: Tensors, trust: Tensors, *, ops, lr: float) -> None:
    """``w -= lr * trust * d`` (LAMB's update)."""
    ops.addcmul_(w, d, trust, value=-lr)
