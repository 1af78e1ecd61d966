"""Supervised image classification: cross-entropy on augmented batches, top-1 test accuracy.

With ``data.mixup_alpha`` / ``data.cutmix_alpha`` every training micro batch is mixed after the
on-device augmentation (:class:`~tvlars_scale.data.mixing.BatchMix`) and the loss is timm's
``SoftTargetCrossEntropy`` of the mixed, label-smoothed targets, as in timm's ``train.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn

from tvlars_scale.config import Config
from tvlars_scale.data import BatchAugment, ImageData
from tvlars_scale.data.loader import PAD_LABEL
from tvlars_scale.data.mixing import BatchMix
from tvlars_scale.tasks.base import Task, build_configured_model

__all__ = ["ClassificationTask"]


class ClassificationTask(Task):
    """Cross-entropy (optionally label-smoothed) of a timm classifier over ``data.num_classes``."""

    def __init__(self, config: Config, data: ImageData, rank: int):
        self.config = config
        self.data = data
        # Streamed data arrives cropped and flipped by the loader: only normalise it here.
        on_device = not data.augmented_in_loader
        layout = torch.channels_last if config.model.channels_last else torch.preserve_format
        self.train_augment = BatchAugment(
            data.mean,
            data.std,
            crop_padding=config.data.crop_padding if on_device else 0,
            flip=config.data.flip and on_device,
            seed=config.run.seed + rank,
            memory_format=layout,
        )
        self.eval_transform = BatchAugment(data.mean, data.std, train=False, memory_format=layout)
        cfg = config.data
        self.mix = None
        if cfg.mixes():
            self.mix = BatchMix(
                data.num_classes,
                mixup_alpha=cfg.mixup_alpha,
                cutmix_alpha=cfg.cutmix_alpha,
                prob=cfg.mixup_prob,
                switch_prob=cfg.mixup_switch_prob,
                label_smoothing=config.task.label_smoothing,
                seed=config.run.seed,
                rank=rank,
            )
            self.soft_target_loss = SoftTargetCrossEntropy()

    def build_model(self) -> nn.Module:
        return build_configured_model(self.config, self.data)

    def training_loss(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        images = self.train_augment(images)
        if self.mix is not None:
            images, targets = self.mix(images, labels)
            return self.soft_target_loss(model(images), targets)
        logits = model(images)
        return F.cross_entropy(logits, labels, label_smoothing=self.config.task.label_smoothing)

    def eval_outputs(self, model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        return self.score(model(self.eval_transform(images)).float(), labels)

    def score(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """:meth:`eval_outputs` from the float logits (tvlars-eval adds top-5 to them)."""
        # Padding samples carry PAD_LABEL, cross_entropy's ignore_index: their loss is 0.
        loss = F.cross_entropy(logits, labels, reduction="none", ignore_index=PAD_LABEL)
        return {
            "loss": loss,
            "correct": logits.argmax(dim=1) == labels,
            "valid": labels != PAD_LABEL,
        }

    def state_dict(self) -> dict:
        state = {"train_augment": self.train_augment.state_dict()}
        if self.mix is not None:
            state["mix"] = self.mix.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.train_augment.load_state_dict(state["train_augment"])
        if self.mix is not None and "mix" in state:  # absent: resumed from a run without mixing
            self.mix.load_state_dict(state["mix"])

    def eval_metrics(self, outputs: dict[str, Tensor]) -> dict[str, float]:
        valid = outputs["valid"]
        num_valid = valid.sum()
        sums = torch.stack([outputs["loss"][valid].sum(), outputs["correct"][valid].sum()]).double()
        # host sync: the two metrics, once per evaluation.
        loss, accuracy = (sums / num_valid).tolist()
        return {"test_loss": loss, "test_accuracy": accuracy}
