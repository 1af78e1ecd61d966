"""A CIFAR-style BatchNorm ResNet small enough to train on Fashion-MNIST on a shared CPU.

He et al. (2016, section 4.2): a 3x3 stem, three stages of BasicBlocks at widths w, 2w, 4w
(strides 1, 2, 2), global average pooling, a linear head; one block per stage is ResNet-8. timm's
ResNet cannot be this small: its stem always has 64 channels at full resolution, which alone costs
more than the whole of this network at width 8. The blocks are timm's (BasicBlock with a 1x1
BatchNorm projection shortcut where the shape changes), registered with timm as
``resnet8_w8`` / ``resnet8_w16`` so a config names them like any other model.
"""

from __future__ import annotations

import itertools

import torch
from timm.models import register_model
from timm.models.resnet import BasicBlock
from torch import nn

from tvlars_scale.models import PooledClassifier


class SmallResNet(PooledClassifier):
    """BatchNorm ResNet of ``depth = 6 n + 2`` layers (n blocks per stage), timm's classifier
    interface (``forward_features`` / ``forward_head`` / ``reset_classifier``)."""

    def __init__(
        self, num_classes: int = 10, in_chans: int = 1, width: int = 8, blocks: int = 1
    ) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages = []
        for index, (c_in, c_out) in enumerate(itertools.pairwise((width, *widths))):
            stride = 1 if index == 0 else 2  # 28 -> 28 -> 14 -> 7
            stage = []
            for block in range(blocks):
                first = block == 0
                shortcut = None
                if first and (stride != 1 or c_in != c_out):
                    shortcut = nn.Sequential(
                        nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
                    )
                stage.append(
                    BasicBlock(
                        c_in if first else c_out,
                        c_out,
                        stride=stride if first else 1,
                        downsample=shortcut,
                    )
                )
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.num_features = widths[-1]
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


def _entry(width: int):
    def build(pretrained: bool = False, **kwargs) -> SmallResNet:
        if pretrained:
            raise ValueError(f"resnet8_w{width} has no pretrained weights")
        for timm_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(timm_only, None)
        return SmallResNet(width=width, **kwargs)

    build.__name__ = f"resnet8_w{width}"
    build.__doc__ = f"ResNet-8 (one BasicBlock per stage) at width {width}."
    return build


def register_small_resnets() -> None:
    """Register ``resnet8_w8`` and ``resnet8_w16`` with timm (once)."""
    import timm

    for width in (8, 16):
        if not timm.is_model(f"resnet8_w{width}"):
            register_model(_entry(width))
