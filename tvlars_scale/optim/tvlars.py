"""TVLARS: Time-Varying LARS (arXiv 2309.14053)."""

from __future__ import annotations

import torch

from . import schedules
from .base import LayerwiseOptimizer
from .functional import decayed_gradient, heavy_ball_apply, ratio_or_one, tvlars_apply

__all__ = ["TVLARS"]

VARIANTS = ("paper", "official")


class TVLARS(LayerwiseOptimizer):
    r"""Time-Varying LARS: LARS whose warm-up is replaced by a sigmoid-shaped factor :math:`\phi_t`.

    ``variant="paper"`` (default) implements Algorithm 1 of the paper. For every layer :math:`k` at
    optimizer step :math:`t = 0, 1, \dots` (optimizer steps, i.e. effective batches):

    .. math::
        \begin{aligned}
        \phi_t &= \frac{1}{\alpha + e^{\lambda (t - d_e)}} + \gamma_{min} \\
        d^k_t &= g^k_t + \beta\, w^k_t \\
        \gamma^k_t &= \eta_0\, \phi_t\, \frac{\eta \lVert w^k_t \rVert}{\lVert d^k_t \rVert}
            \quad (\text{trust } 1 \text{ if either norm is } 0) \\
        m^k_{t+1} &= w^k_t - \gamma^k_t d^k_t, \qquad m^k_0 = w^k_0 \\
        w^k_{t+1} &= m^k_{t+1} + \mu\,(m^k_{t+1} - m^k_t)
        \end{aligned}

    with :math:`\eta_0` = ``lr`` (the paper's target LR), :math:`\beta` = ``weight_decay``,
    :math:`\mu` = ``momentum``, :math:`d_e` = ``delay_steps`` (the paper's 10 epochs, converted to
    optimizer steps by the caller). The factor starts at :math:`1/\alpha + \gamma_{min}`, holds for about
    ``delay_steps`` steps and decays with steepness ``lmbda`` towards ``gamma_min``, the floor of the
    step size. The paper gives no value for :math:`\gamma_{min}`; the default ``0.0`` keeps its pure
    sigmoid, so very long runs anneal towards zero step size; set it to keep a minimum step.

    Layers excluded from adaptation -- a group with ``adapt=False``, or with ``exclude_1d=True`` (default)
    a layer whose original shape has at most one dimension (biases, norm layers) -- take trust 1, and with
    ``exclude_1d`` also no weight decay: their step is :math:`\eta_0 \phi_t g`, so :math:`\phi_t` still
    schedules them, as warm-up schedules every parameter in LARS.

    ``variant="official"`` reproduces the authors' public code (github.com/KhoiDOO/tvlars,
    ``opt/tvlars.py``) as it runs:

    .. math::
        \phi_t = \begin{cases} 1 & t < d \quad (\text{plain LARS}) \\
                 1 / (0.1 + e^{\lambda (t + 1)}) & t \ge d \end{cases}

    with :math:`d` = ``delay_steps`` and :math:`t` the optimizer step counted from the start of
    training, not from the end of the delay (the code's ``step_cnt`` is never reset: at the first
    step after the delay :math:`\phi` is already :math:`1 / (0.1 + e^{\lambda (d + 1)})`).

    .. note:: Which revision each form follows (checked against the repository's history):

        * ``delay_steps > 0``: commit ``10bcfd2`` (2023-08-17, "update tvlars apply"), the code of
          the paper's experiments (arXiv v1 is of September 2023). Its ``step(unit_step_cnt,
          epoch_delay_cnt=10)`` takes plain LARS (ratio :math:`\eta \lVert w \rVert / \lVert d \rVert`,
          no :math:`\phi`) while ``int(step_cnt / unit_step_cnt) < epoch_delay_cnt``, i.e. for
          ``step_cnt < 10 * len(train_loader)``; ``clf.py`` and ``self_sl.py`` pass
          ``unit_step_cnt=len(train_loader)``. So ``delay_steps`` counts optimizer steps (the
          config's ``delay_epochs``, default 10, times the steps per epoch).
        * ``delay_steps = 0`` (the constructor's default): the last revision, ``89c3291``
          (2023-11-20, "update"), which drops the delay branch (it still accepts and ignores
          ``unit_step_cnt`` / ``epoch_delay_cnt``); identical to ``10bcfd2`` with a zero delay.
        * Earlier revisions differ and are not reproduced: ``7d15a5e`` .. ``fb40d72`` (2023-05-18)
          raise a ``TypeError`` on their first step (``self.step`` used as a counter), so they do
          not run at all; ``7a604b1`` .. ``d52d3bd`` (May-July 2023) use
          :math:`\phi_t = e^{-\lambda (t + 1)}` (no 0.1) and ``d52d3bd`` no norm clamping.

    Differences of the ``official`` variant from the paper:

    * :math:`\alpha` fixed at 0.1 (after the delay), no :math:`\gamma_{min}`; the step from the
      delay to the decay is a jump, not a sigmoid (``alpha`` and ``gamma_min`` must stay at their
      defaults);
    * both norms are clamped to :math:`[0, 10]` before the ratio, and :math:`\phi_t` multiplies the
      trust ratio only when both norms are positive (otherwise the ratio is exactly 1);
    * heavy-ball momentum on the scaled direction:
      :math:`b \leftarrow \mu b + \phi_t\, \text{trust}\, d`, :math:`w \leftarrow w - \eta_0 b`
      (the ratio scales the direction before it enters the momentum, not the buffer after it);
    * excluded (1-D) layers step at the raw ``lr`` (ratio 1, no :math:`\phi_t`).

    The step counter ``t`` is kept per tensor in ``state[p]["step"]`` and saved by ``state_dict``. The
    paper variant's ``state[p]["momentum_buffer"]`` holds :math:`m_t - m_{t-1}` (zero at the start),
    which gives the same iterates as the :math:`m` recursion while updating in place.
    After each step, :meth:`layer_stats` and :attr:`telemetry` expose each layer's weight norm, update
    norm and trust ratio, and :attr:`last_phi` the factor used.

    Args:
        params: parameters or parameter groups (groups may set ``adapt``, ``exclude_1d``,
            ``weight_decay``, ``lr``, ...).
        lr: target learning rate :math:`\eta_0` (a float or a 0-dim tensor). The default ``1.0`` is
            the smallest of the paper's target LRs (1 to 19 across its batch sizes) and
            the default of timm's ``Lars``: with the trust coefficient :math:`\eta = 10^{-3}` an
            adapted layer moves by about :math:`\eta_0 \phi_t \eta = 0.1\%` of its norm per step,
            a safe start. Large batches want more (the configs set it, scaled with the batch);
            ``torch.optim.SGD``'s ``1e-3`` would move a layer by a millionth of its norm.
        momentum: :math:`\mu`. weight_decay: :math:`\beta`. eta: trust coefficient :math:`\eta`.
        lmbda: steepness :math:`\lambda` of the decay (paper: 1e-4 classification, 1e-5 Barlow Twins).
        alpha, gamma_min: shape of :math:`\phi_t` (paper variant only).
        delay_steps: the delay :math:`d_e` in optimizer steps (paper: inside the sigmoid; official:
            plain LARS before it, 0 for the no-delay form).
        variant: ``"paper"`` or ``"official"`` (keyword-only, like the flags below).
        exclude_1d: exclude layers of at most one dimension from adaptation and weight decay.
        foreach: ``True`` multi-tensor path, ``False`` per-tensor loop, ``None`` picks (see base).
    """

    _buffers = ("momentum_buffer",)

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        eta: float = 1e-3,
        lmbda: float = 1e-4,
        alpha: float = 1.0,
        delay_steps: int = 0,
        gamma_min: float = 0.0,
        *,
        variant: str = "paper",
        exclude_1d: bool = True,
        foreach: bool | None = None,
    ) -> None:
        _check_nonnegative(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lmbda=lmbda
        )
        _check_nonnegative(delay_steps=delay_steps, gamma_min=gamma_min)
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if variant == "official" and (alpha, gamma_min) != (1.0, 0.0):
            raise ValueError("the official variant fixes alpha=0.1 and has no gamma_min")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            lmbda=lmbda,
            alpha=alpha,
            delay_steps=delay_steps,
            gamma_min=gamma_min,
            variant=variant,
            exclude_1d=exclude_1d,
        )
        super().__init__(params, defaults, foreach=foreach)
        self.last_phi: float | None = None

    def phi(self, group: dict, step: int) -> float:
        """The factor :math:`\\phi_t` this group uses at optimizer step ``step``."""
        if group["variant"] == "official":
            # Plain LARS during the delay: phi exactly 1 leaves eta * ||w|| / ||d|| as it is.
            if step < group["delay_steps"]:
                return 1.0
            return schedules.phi_official(step, group["lmbda"])
        return schedules.phi(
            step, group["lmbda"], group["alpha"], group["delay_steps"], group["gamma_min"]
        )

    def _direction(self, w, g, states, *, group, ops, weight_decay, step, out):
        d = decayed_gradient(w, g, ops=ops, weight_decay=weight_decay, out=out)
        return d, d

    def _trust(self, weight_norm, update_norm, *, group, step):
        if group["variant"] == "official":
            weight_norm, update_norm = weight_norm.clamp(0, 10), update_norm.clamp(0, 10)
            coefficient = group["eta"] * self.phi(group, step)
        else:
            coefficient = group["eta"]
        return ratio_or_one(coefficient * weight_norm / update_norm, weight_norm, update_norm)

    def _apply(self, w, d, states, trust, *, group, ops, step):
        phi = self.phi(group, step)
        self.last_phi = phi
        buffers = states["momentum_buffer"]
        if group["variant"] == "official":
            heavy_ball_apply(
                w,
                d,
                buffers,
                list(trust.unbind(0)),
                ops=ops,
                lr=group["lr"],
                momentum=group["momentum"],
                nesterov=False,
            )
        else:
            neg_gamma = (trust * (-group["lr"] * phi)).unbind(0)
            tvlars_apply(w, d, buffers, list(neg_gamma), ops=ops, momentum=group["momentum"])


def _check_nonnegative(**values: float) -> None:
    for name, value in values.items():
        # As torch: a tensor lr is a scalar (one element), not a per-element rate.
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            raise ValueError(f"{name} as a tensor must have one element, got {tuple(value.shape)}")
        if not value >= 0:  # also rejects NaN
            raise ValueError(f"{name} must be >= 0, got {value}")
