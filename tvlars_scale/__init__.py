"""tvlars_scale: TVLARS, LARS and LAMB for very large batch training, sharding-aware under DeepSpeed ZeRO."""

from .optim import LAMB, LARS, TVLARS, build_optimizer, layerwise_param_groups, register_with_timm

register_with_timm()

__all__ = ["LAMB", "LARS", "TVLARS", "build_optimizer", "layerwise_param_groups"]
__version__ = "0.1.0"
