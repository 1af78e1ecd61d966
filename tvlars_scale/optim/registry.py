"""Parameter groups, a by-name factory, and registration with timm's optimizer factory."""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.optim import Optimizer

from .lamb import LAMB
from .lars import LARS
from .tvlars import TVLARS

__all__ = ["OPTIMIZERS", "build_optimizer", "layerwise_param_groups", "register_with_timm"]

OPTIMIZERS = {
    "tvlars": TVLARS,
    "tvlars_official": partial(TVLARS, variant="official"),
    "lars": LARS,
    "lamb": LAMB,
}


def layerwise_param_groups(
    model: nn.Module, weight_decay: float, *, exclude_1d: bool = True
) -> list[dict]:
    """The usual two groups: weights of >= 2 dims are decayed and adapted; 1-D parameters and biases
    (norm layers' affine, biases) get neither. ``exclude_1d=False``: one group, every parameter
    decayed and adapted (the layer-wise optimizers' ``exclude_1d=False``). Parameter names travel
    with the groups for telemetry."""
    decay, no_decay = ([], []), ([], [])
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        excluded = exclude_1d and (param.ndim <= 1 or name.endswith(".bias"))
        target = no_decay if excluded else decay
        target[0].append(param)
        target[1].append(name)
    groups = [
        {"params": decay[0], "param_names": decay[1], "weight_decay": weight_decay},
        {"params": no_decay[0], "param_names": no_decay[1], "weight_decay": 0.0, "adapt": False},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(
    name: str, model: nn.Module, lr: float, weight_decay: float, **kwargs
) -> Optimizer:
    """Build ``name`` (``tvlars``, ``tvlars_official``, ``lars`` or ``lamb``) over ``model``'s usual groups."""
    try:
        factory = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}") from None
    return factory(
        layerwise_param_groups(model, weight_decay), lr=lr, weight_decay=weight_decay, **kwargs
    )


def register_with_timm() -> None:
    """Make ``timm.optim.create_optimizer_v2(model, 'tvlars' | 'tvlars_official', ...)`` build ours.

    Registered as timm registers its own variants: one class, the variant in ``defaults``. Calling it
    again registers nothing new.
    """
    from timm.optim import OptimInfo, list_optimizers
    from timm.optim._optim_factory import default_registry

    registered = set(list_optimizers(["tvlars", "tvlars_official", "official"]))
    for info in (
        OptimInfo(
            name="tvlars",
            opt_class=TVLARS,
            description="Time-Varying LARS (paper variant)",
            has_eps=False,
            has_momentum=True,
        ),
        OptimInfo(
            name="tvlars_official",
            opt_class=TVLARS,
            description="Time-Varying LARS (authors' reference code)",
            has_eps=False,
            has_momentum=True,
            defaults={"variant": "official"},
        ),
    ):
        if info.name not in registered:
            default_registry.register(info)
    # timm parses 'a_b' as option 'a' for optimizer 'b' ('lookahead_adam'), so 'tvlars_official'
    # reaches the registry as 'official'.
    if "official" not in registered:
        default_registry.register_alias("official", "tvlars_official")
