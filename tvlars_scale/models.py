"""Model factory: any timm model by name, the CIFAR stem for small images, the paper's init.

Importing this module registers ``digits_cnn`` with timm, so it is built by name like any other
timm model.
"""

from __future__ import annotations

import itertools

import timm
import torch
from timm.models import get_pretrained_cfg, register_model
from timm.models.resnet import ResNet
from torch import nn

INITS = ("kaiming_uniform", "timm")
# Up to Tiny ImageNet's 64 px, ImageNet's 7x7 stride-2 stem and max-pool (4x downsampling before
# the first block) throw away most of the image; the CIFAR ResNets use a 3x3 stride-1 stem instead.
CIFAR_STEM_MAX_SIZE = 64


class ModelError(ValueError):
    """A model cannot be built as asked; the message is one line naming the model."""


def build_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    image_size: int = 32,
    cifar_stem: bool | None = None,
    sync_batchnorm: bool = False,
    init: str = "kaiming_uniform",
    **timm_kwargs,
) -> nn.Module:
    """Build timm model ``name`` (no pretrained weights) for ``num_classes`` classes.

    Args:
        name: any name of ``timm.list_models()``, or ``digits_cnn``.
        in_chans: input channels (1 for digits).
        image_size: input side length; passed on to models with a fixed input size (ViTs), and
            decides the default of ``cifar_stem``.
        cifar_stem: ResNets only: replace the 7x7 stride-2 stem conv and max-pool by one 3x3
            stride-1 conv. None: on for ResNets when ``image_size <= 64``.
        sync_batchnorm: convert BatchNorm layers to SyncBatchNorm (batch statistics over all
            ranks). PyTorch syncs them on GPUs only: on CPU with several ranks their forward fails.
        init: ``kaiming_uniform`` (the paper's: every conv and linear weight drawn from
            Kaiming-uniform with ReLU gain and fan-in, biases zero, norm layers weight 1 bias 0)
            or ``timm`` (the model's own init).
        timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``).
    """
    if not timm.is_model(name):
        raise ModelError(f"unknown model '{name}': not a timm model name (see timm.list_models())")
    if init not in INITS:
        raise ModelError(f"unknown init '{init}' for model '{name}': choose one of {INITS}")
    if num_classes < 1 or in_chans < 1 or image_size < 1:
        raise ModelError(
            f"model '{name}' needs num_classes, in_chans and image_size >= 1, got "
            f"{num_classes}, {in_chans}, {image_size}"
        )
    pretrained_cfg = get_pretrained_cfg(name)
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        timm_kwargs.setdefault("img_size", image_size)
    model = timm.create_model(
        name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **timm_kwargs
    )
    is_resnet = isinstance(model, ResNet)
    if cifar_stem is None:
        cifar_stem = is_resnet and image_size <= CIFAR_STEM_MAX_SIZE
    if cifar_stem:
        if not is_resnet:
            raise ModelError(f"cifar_stem needs a timm ResNet, but '{name}' is not one")
        use_cifar_stem(model)
    if init == "kaiming_uniform":
        init_kaiming_uniform(model)
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def use_cifar_stem(model: ResNet) -> None:
    """Replace a timm ResNet's stem (conv + max-pool) by a 3x3 stride-1 conv, in place."""
    first_conv = next(m for m in model.conv1.modules() if isinstance(m, nn.Conv2d))
    model.conv1 = nn.Conv2d(
        first_conv.in_channels, model.bn1.num_features, kernel_size=3, padding=1, bias=False
    )
    model.maxpool = nn.Identity()


def init_kaiming_uniform(model: nn.Module) -> None:
    """The paper's init: Kaiming-uniform conv/linear weights, zero biases, identity norm layers.

    It also undoes timm's zero-init of each residual block's last BatchNorm, as the paper's
    ResNets do not use that trick. Parameters of other layer types (e.g. a ViT's position
    embedding) keep timm's init.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class PooledClassifier(nn.Module):
    """timm's classifier interface over ``forward_features`` (a subclass's): global average pooling
    and the linear ``head`` of ``num_features`` inputs, which a subclass builds."""

    num_features: int
    head: nn.Module

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()


class DigitsCNN(PooledClassifier):
    """Three 3x3 conv blocks and a linear head: a few seconds per epoch of 8x8 digits on a CPU.

    GroupNorm instead of BatchNorm: no batch statistics, so a batch split into micro batches,
    accumulation steps or ranks gives the same gradients as the whole batch. Follows timm's
    classifier interface (``forward_features`` / ``forward_head`` / ``reset_classifier``) so the
    self-supervised and linear-evaluation tasks can use it as a backbone.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32) -> None:
        super().__init__()
        channels = (in_chans, width, 2 * width, 4 * width)
        layers: list[nn.Module] = []
        for index, (c_in, c_out) in enumerate(itertools.pairwise(channels)):
            stride = 1 if index == 0 else 2  # 8x8 -> 8x8 -> 4x4 -> 2x2
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.GroupNorm(num_groups=8, num_channels=c_out),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.num_features = channels[-1]
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@register_model
def digits_cnn(pretrained: bool = False, **kwargs) -> DigitsCNN:
    """timm entry point of :class:`DigitsCNN` (no pretrained weights exist)."""
    if pretrained:
        raise ModelError("digits_cnn has no pretrained weights")
    for timm_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(timm_only, None)
    return DigitsCNN(**kwargs)
