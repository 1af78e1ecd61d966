"""Mixup and CutMix of a micro batch on the training device, with timm's semantics.

What is drawn and how it is applied follow ``timm.data.mixup.Mixup`` in its default ``batch``
mode (one weight and one box per batch): with probability ``prob`` a batch is mixed; with both
alphas set, CutMix is chosen with probability ``switch_prob``; the weight ``lam`` comes from
``Beta(alpha, alpha)``; Mixup is ``lam x + (1 - lam) x.flip(0)``, CutMix pastes a box of
``x.flip(0)`` whose side is ``sqrt(1 - lam)`` of the image's and then corrects ``lam`` to the
area left after clipping at the border; the targets are timm's own :func:`mixup_target` (one-hot,
label-smoothed, mixed with the reversed batch's by ``lam``).

The difference is where the randomness comes from: timm draws from NumPy's global generator,
which nothing saves with a checkpoint. Here each micro batch gets its own generator, seeded by
``(seed, rank, micro batches mixed so far)``, and that count is the whole state
(:meth:`BatchMix.state_dict`): a resumed run draws exactly what the uninterrupted one would have.
The draws of one micro batch depend on nothing else, so under accumulation and uneven micro batches
(:mod:`tvlars_scale.batching`) every micro batch is mixed on its own, as timm mixes each batch its
loader yields (odd sizes included: the reversal pairs the middle sample with itself).
"""

from __future__ import annotations

import numpy as np
import torch
from timm.data.mixup import mixup_target

__all__ = ["BatchMix", "cutmix_box"]

# Tells this generator's seeds apart from the per-sample (seed, epoch, index) ones of the loaders.
_MIX_STREAM = 0x6D6978


def cutmix_box(
    height: int, width: int, lam: float, rng: np.random.Generator
) -> tuple[tuple[int, int, int, int], float]:
    """``((top, bottom, left, right), corrected lam)``: timm's ``rand_bbox`` (no margin) and the
    ``correct_lam`` of ``cutmix_bbox_and_lam``, the centre drawn from ``rng``."""
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + (cut_h + 1) // 2, 0, height)
    left, right = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + (cut_w + 1) // 2, 0, width)
    area = (bottom - top) * (right - left)
    return (int(top), int(bottom), int(left), int(right)), 1.0 - area / float(height * width)


class BatchMix:
    """``(float images [B, C, H, W], int64 labels [B])`` -> mixed images (in place) and soft
    targets ``float32 [B, num_classes]``; see the module docstring."""

    def __init__(
        self,
        num_classes: int,
        *,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("BatchMix needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing
        self.seed, self.rank = seed, rank
        self.num_mixed = 0  # micro batches drawn for so far: the generator's whole state

    def draw(self, rng: np.random.Generator) -> tuple[float, bool]:
        """``(lam, use_cutmix)`` for one batch: timm's ``Mixup._params_per_batch``."""
        if rng.random() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(rng.beta(alpha, alpha)), use_cutmix

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, _MIX_STREAM, self.rank, self.num_mixed])
        self.num_mixed += 1
        lam, use_cutmix = self.draw(rng)
        if lam != 1.0:  # timm's Mixup._mix_batch, in place
            if use_cutmix:
                (top, bottom, left, right), lam = cutmix_box(*images.shape[-2:], lam, rng)
                images[:, :, top:bottom, left:right] = images.flip(0)[:, :, top:bottom, left:right]
            else:
                flipped = images.flip(0).mul_(1.0 - lam)
                images.mul_(lam).add_(flipped)
        return images, mixup_target(labels, self.num_classes, lam, self.label_smoothing)

    def state_dict(self) -> dict[str, int]:
        return {"num_mixed": self.num_mixed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.num_mixed = state["num_mixed"]
