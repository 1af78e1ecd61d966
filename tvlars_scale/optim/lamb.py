"""LAMB as the paper's baseline (pytorch-optimizer semantics)."""

from __future__ import annotations

import torch

from .base import LayerwiseOptimizer
from .functional import lamb_direction, ratio_or_one, scaled_apply
from .tvlars import _check_nonnegative

__all__ = ["LAMB"]


class LAMB(LayerwiseOptimizer):
    r"""Layer-wise Adaptive Moments (You et al. 2019), as pytorch-optimizer (jettify) implements it.

    .. math::
        \begin{aligned}
        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        u &= \frac{m}{\sqrt{v} + \epsilon} + \lambda w, \qquad
        \text{trust} = \frac{\min(\lVert w \rVert, c)}{\lVert u \rVert} \quad (1 \text{ if either is } 0) \\
        w &\leftarrow w - \eta_0\, \text{trust}\, u
        \end{aligned}

    with :math:`c` = ``clamp_value``. As in pytorch-optimizer's default (``debias=False``, the paper's v3)
    the moments are not bias-corrected. Excluded layers get trust 1 and no weight decay. ``lr`` (a
    float or a 0-dim tensor) defaults to pytorch-optimizer's ``1e-3``.
    ``exclude_1d`` and ``foreach`` are keyword-only and mean what they mean for
    :class:`~tvlars_scale.optim.TVLARS`.
    """

    _buffers = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        clamp_value: float = 10.0,
        *,
        exclude_1d: bool = True,
        foreach: bool | None = None,
    ) -> None:
        _check_nonnegative(lr=lr, eps=eps, weight_decay=weight_decay, clamp_value=clamp_value)
        for index, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{index}] must be in [0, 1), got {beta}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            clamp_value=clamp_value,
            exclude_1d=exclude_1d,
        )
        super().__init__(params, defaults, foreach=foreach)

    def _direction(self, w, g, states, *, group, ops, weight_decay, step, out):
        beta1, beta2 = group["betas"]
        d = lamb_direction(
            w,
            g,
            states["exp_avg"],
            states["exp_avg_sq"],
            ops=ops,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=weight_decay,
            out=out,
        )
        return d, d

    def _trust(self, weight_norm, update_norm, *, group, step):
        weight_norm = weight_norm.clamp(0, group["clamp_value"])
        return ratio_or_one(weight_norm / update_norm, weight_norm, update_norm)

    def _apply(self, w, d, states, trust, *, group, ops, step):
        scaled_apply(w, d, list(trust.unbind(0)), ops=ops, lr=group["lr"])
