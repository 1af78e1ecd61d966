"""Schedules as pure functions of the optimizer step.

``t`` (``step``) always counts optimizer steps (effective batches), never micro-batches. Every function
returns a plain float, so calling it costs no device work and no host-device sync.
"""

from __future__ import annotations

import math

__all__ = ["phi", "phi_official", "polynomial_decay", "warmup_cosine"]


def phi(
    step: int, lmbda: float, alpha: float = 1.0, delay_steps: int = 0, gamma_min: float = 0.0
) -> float:
    r"""TVLARS's time-varying factor (Algorithm 1 of arXiv 2309.14053).

    .. math:: \phi_t = \frac{1}{\alpha + e^{\lambda (t - d)}} + \gamma_{min}

    Starts near :math:`1/\alpha + \gamma_{min}` (an exploratory phase with a large step), stays there for
    about ``delay_steps`` steps, then decays along a sigmoid of steepness ``lmbda`` towards ``gamma_min``.
    """
    exponent = lmbda * (step - delay_steps)
    # exp overflows to inf above ~709: the factor is then exactly its floor.
    if exponent > 700.0:
        return gamma_min
    return 1.0 / (alpha + math.exp(exponent)) + gamma_min


def phi_official(step: int, lmbda: float) -> float:
    r"""The authors' reference code: :math:`\phi_t = 1 / (0.1 + e^{\lambda (t + 1)})`."""
    exponent = lmbda * (step + 1)
    return 0.0 if exponent > 700.0 else 1.0 / (0.1 + math.exp(exponent))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    r"""LR multiplier: linear warm-up, then cosine (the paper's Appendix A form).

    During warm-up the multiplier grows linearly from ``1 / warmup_steps`` to 1. Afterwards
    :math:`q = (1 + \cos(\pi s / S)) / 2` with ``s`` the steps since warm-up ended and ``S`` the steps
    left, and the multiplier is :math:`q + r (1 - q)` with ``r = min_ratio``, i.e.
    ``lr_t = lr * q + lr_min * (1 - q)``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    q = 0.5 * (1.0 + math.cos(math.pi * progress))
    return q + min_ratio * (1.0 - q)


def polynomial_decay(
    step: int, total_steps: int, power: float = 2.0, min_ratio: float = 0.0
) -> float:
    """LR multiplier without warm-up: ``(1 - t / T) ** power``, floored at ``min_ratio`` (LARS's usual decay)."""
    progress = min(1.0, step / max(1, total_steps))
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress) ** power
