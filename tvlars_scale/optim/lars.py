"""LARS as the paper's baseline (Lightning Flash semantics)."""

from __future__ import annotations

import torch

from .base import LayerwiseOptimizer
from .functional import decayed_gradient, heavy_ball_apply, ratio_or_one
from .tvlars import _check_nonnegative

__all__ = ["LARS"]


class LARS(LayerwiseOptimizer):
    r"""Layer-wise Adaptive Rate Scaling (You et al. 2017), as Lightning Flash implements it.

    .. math::
        \begin{aligned}
        \text{trust}^k &= \frac{\eta \lVert w^k \rVert}{\lVert g^k \rVert + \beta \lVert w^k \rVert
            + \epsilon} \quad (1 \text{ if either norm is } 0) \\
        b^k &\leftarrow \mu b^k + \text{trust}^k (g^k + \beta w^k), \qquad
        w^k \leftarrow w^k - \eta_0\, b^k
        \end{aligned}

    (``nesterov=True``: :math:`w \leftarrow w - \eta_0 (\text{trust}\, d + \mu b)`). Pair it with a
    schedule from :mod:`~tvlars_scale.optim.schedules` (the paper: 20 epochs linear warm-up then cosine,
    or polynomial decay without warm-up).

    .. note:: Flash skips the adaptation of every layer when ``weight_decay == 0``; here adaptation is
        decided per layer (``adapt`` / ``exclude_1d``), independently of the weight decay. Excluded
        layers get trust 1 and no weight decay. The first step's buffer is the scaled direction itself,
        as in Flash (a zero buffer times ``momentum`` plus the direction).

    ``lr`` (:math:`\eta_0`, a float or a 0-dim tensor) defaults to ``1.0``, as timm's ``Lars``
    (Flash requires it): with :math:`\eta = 10^{-3}` an adapted layer then moves by about 0.1% of
    its norm per step, while ``torch.optim.SGD``'s ``1e-3`` would move it by a millionth. The paper's
    LARS baselines run at 1 to 19 with the batch; the configs set it. ``exclude_1d`` and ``foreach``
    are keyword-only and mean what they mean for :class:`~tvlars_scale.optim.TVLARS`; ``nesterov``
    may be positional, as in ``torch.optim.SGD``.
    """

    _buffers = ("momentum_buffer",)

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        eta: float = 1e-3,
        eps: float = 1e-8,
        nesterov: bool = False,
        *,
        exclude_1d: bool = True,
        foreach: bool | None = None,
    ) -> None:
        _check_nonnegative(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps)
        if nesterov and momentum == 0:
            raise ValueError("nesterov momentum needs momentum > 0")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            eps=eps,
            nesterov=nesterov,
            exclude_1d=exclude_1d,
        )
        super().__init__(params, defaults, foreach=foreach)

    def _direction(self, w, g, states, *, group, ops, weight_decay, step, out):
        return decayed_gradient(w, g, ops=ops, weight_decay=weight_decay, out=out), g

    def _trust(self, weight_norm, grad_norm, *, group, step):
        ratio = (
            group["eta"]
            * weight_norm
            / (grad_norm + group["weight_decay"] * weight_norm + group["eps"])
        )
        return ratio_or_one(ratio, weight_norm, grad_norm)

    def _apply(self, w, d, states, trust, *, group, ops, step):
        heavy_ball_apply(
            w,
            d,
            states["momentum_buffer"],
            list(trust.unbind(0)),
            ops=ops,
            lr=group["lr"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
        )
