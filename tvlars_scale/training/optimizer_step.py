"""One optimizer step of the loop, after the last micro-batch's backward: clip, check, step.

* DeepSpeed: the engine stepped (or skipped a non-finite step) inside the last backward, clipping as
  ``optim.grad_clip`` told its ``gradient_clipping``; its norm before clipping is read back.
* fp16 (a GradScaler): the gradients are unscaled before clipping; the scaler skips non-finite
  steps itself and must see them to lower the scale.
* otherwise: clip (:mod:`.clip`), then skip the step when a gradient is NaN/Inf
  (:mod:`tvlars_scale.nonfinite`), else step.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from tvlars_scale.nonfinite import gradients_are_finite
from tvlars_scale.optim.sharding import ShardedLayout
from tvlars_scale.training.clip import clip_grad_norm

__all__ = ["OptimizerStep"]


class OptimizerStep:
    """``step()`` -> whether the step was applied; :attr:`grad_norm` is the last clipped step's
    gradient norm before clipping (``None`` without ``grad_clip``)."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        layout: ShardedLayout,
        grad_clip: float | None,
    ):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.layout, self.grad_clip = layout, grad_clip or None
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.grad_norm: torch.Tensor | float | None = None

    def step(self) -> bool:
        if self.deepspeed:
            if self.grad_clip:
                self.grad_norm = self.model.get_global_grad_norm()
            return self.model.was_step_applied()
        scaler = self.accelerator.scaler
        if self.grad_clip:
            if scaler is not None:
                self.accelerator.unscale_gradients()
            self.grad_norm = clip_grad_norm(self.layout, self.grad_clip)
        if scaler is not None:
            self.optimizer.step()
            return not self.optimizer.step_was_skipped
        # Gradients are all-reduced already, so every rank takes the same decision.
        # host sync: one bool per step, inside gradients_are_finite.
        if not gradients_are_finite(self.model.parameters()):
            return False
        self.optimizer.step()
        return True
