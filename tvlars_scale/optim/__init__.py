"""Layer-wise optimizers for very large batches: TVLARS, LARS, LAMB (sharding-aware)."""

from . import schedules
from .fsdp_layout import bind_fsdp
from .lamb import LAMB
from .lars import LARS
from .registry import OPTIMIZERS, build_optimizer, layerwise_param_groups, register_with_timm
from .sharding import Piece, ShardedLayout, TensorLayout
from .tvlars import TVLARS
from .zero_layout import bind_zero

__all__ = [
    "LAMB",
    "LARS",
    "OPTIMIZERS",
    "TVLARS",
    "Piece",
    "ShardedLayout",
    "TensorLayout",
    "bind_fsdp",
    "bind_zero",
    "build_optimizer",
    "layerwise_param_groups",
    "register_with_timm",
    "schedules",
]
