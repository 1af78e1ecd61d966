"""What a PyTorch FSDP2 rank's optimizer holds, described as pieces of whole, named layers.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter the optimizer steps is a
``DTensor`` whose local tensor is a block of rows (``Shard(0)``) of the whole parameter. FSDP2 cuts
rows like ``torch.chunk``: each of the ``n`` ranks of the shard dimension holds
``ceil(rows / n)`` rows, the last ones fewer, and a layer with fewer rows than ranks leaves the
last ranks nothing (7 rows on 2 ranks: 4 + 3; 1 row on 3 ranks: 1 + 0 + 0). The rows of rank ``r``
are one contiguous run of the flattened layer, so each local tensor is at most one
:class:`~tvlars_scale.optim.sharding.Piece` whose layer offset is ``first row x row size``.

On an HSDP mesh (``(replicate, shard)``, placements ``(Replicate(), Shard(0))``) the replicas of a
shard group hold the same rows and step them identically: the norm all-reduce runs over the shard
dimension's process group only, so no row is counted twice.

:func:`bind_fsdp` binds a layer-wise optimizer once after ``fully_shard`` / ``accelerator.prepare``;
an optimizer handed sharded DTensors without a layout raises instead of taking shard-local norms
(:class:`~tvlars_scale.optim.base.LayerwiseOptimizer`). The geometry is read from each DTensor's
mesh and placements alone: building the layout issues no collective.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from .sharding import Piece, ShardedLayout, TensorLayout

__all__ = ["bind_fsdp", "fsdp_layout", "is_sharded_dtensor", "shard_rows"]


def is_sharded_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor whose local tensor is only part of it."""
    return isinstance(tensor, DTensor) and any(p.is_shard() for p in tensor.placements)


def shard_rows(tensor: DTensor) -> tuple[int, int, int]:
    """``(mesh dim, first row, number of rows)`` of the rows of ``tensor`` this rank holds.

    Only ``Shard(0)`` along one mesh dimension (with ``Replicate()`` along the others) is described;
    anything else -- tensor parallelism's other dims, ``_StridedShard``, ``Partial`` -- raises
    ``NotImplementedError``: a layout of it would give wrong norms.
    """
    shard_dims = []
    for mesh_dim, placement in enumerate(tensor.placements):
        if type(placement) is Shard and placement.dim == 0:
            shard_dims.append(mesh_dim)
        elif type(placement) is not Replicate:
            raise NotImplementedError(
                f"bind_fsdp: a DTensor placed {tensor.placements} (only Shard(0) on one mesh "
                "dimension, Replicate() on the others, as FSDP2 / HSDP place parameters)"
            )
    if len(shard_dims) != 1:
        raise NotImplementedError(
            f"bind_fsdp: a DTensor placed {tensor.placements} is sharded along "
            f"{len(shard_dims)} mesh dimensions; FSDP2 / HSDP shard along exactly one"
        )
    mesh_dim = shard_dims[0]
    num_ranks = tensor.device_mesh.size(mesh_dim)
    rank = tensor.device_mesh.get_local_rank(mesh_dim)
    rows = tensor.shape[0]
    chunk = math.ceil(rows / num_ranks)  # torch.chunk's split, which FSDP2 uses
    first = min(rank * chunk, rows)
    count = max(0, min(chunk, rows - first))
    local_rows = tensor._local_tensor.shape[0] if tensor._local_tensor.dim() else 0
    if local_rows != count:
        # Guards against FSDP2 changing how it splits rows: a mismatch would mis-assign elements.
        raise RuntimeError(
            f"bind_fsdp: this rank holds {local_rows} rows of a {tuple(tensor.shape)} parameter, "
            f"torch.chunk's split gives {count}; this torch version is not supported"
        )
    return mesh_dim, first, count


def fsdp_layout(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None):
    """The :class:`ShardedLayout` of the DTensors ``optimizer`` steps on this rank.

    Layers are named as in ``model`` (its ``named_parameters``), else by the groups'
    ``param_names``, else ``group{i}.param{j}``. Every parameter must be a sharded DTensor on one
    and the same shard group (the one the norms are all-reduced over).
    """
    model_names = {} if model is None else {id(p): n for n, p in model.named_parameters()}
    names, shapes, tensors = [], [], []
    group_key = None
    process_group, replica_rank = None, 0
    for group_index, group in enumerate(optimizer.param_groups):
        group_names = group.get("param_names")
        for index, p in enumerate(group["params"]):
            if not is_sharded_dtensor(p):
                raise TypeError(
                    f"bind_fsdp: parameter {index} of group {group_index} (shape "
                    f"{tuple(p.shape)}) is not a sharded DTensor; shard the whole model with "
                    "fully_shard before binding"
                )
            mesh_dim, first, count = shard_rows(p)
            mesh = p.device_mesh
            key = (mesh, mesh_dim)
            if group_key is None:
                group_key = key
                # The shard dimension's group: HSDP replicas are not part of it.
                process_group = mesh.get_group(mesh_dim)
                replica_rank = _replica_rank(mesh, mesh_dim)
            elif key != group_key:
                raise NotImplementedError(
                    "bind_fsdp: parameters sharded over different meshes or mesh dimensions are "
                    "not supported (one norm all-reduce must cover every layer)"
                )
            layer = len(names)
            if id(p) in model_names:
                names.append(model_names[id(p)])
            elif group_names:
                names.append(group_names[index])
            else:
                names.append(f"group{group_index}.param{index}")
            shapes.append(tuple(p.shape))
            row_numel = math.prod(p.shape[1:])
            numel = count * row_numel
            pieces = (
                (Piece(layer, start=0, numel=numel, layer_offset=first * row_numel),)
                if numel
                else ()
            )
            tensors.append((p, TensorLayout((layer,), pieces)))
    return ShardedLayout(names, shapes, tensors, process_group, replica_rank=replica_rank)


def _replica_rank(mesh, shard_dim: int) -> int:
    """This rank's index among the ranks holding the same rows (row-major over the other dims)."""
    coordinate = mesh.get_coordinate()
    index = 0
    for dim, position in enumerate(coordinate):
        if dim != shard_dim:
            index = index * mesh.size(dim) + position
    return index


def bind_fsdp(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None):
    """Bind a layer-wise optimizer to the FSDP2 shards it steps; call once after ``fully_shard``
    (or ``accelerator.prepare``), before the first step. ``model`` names the layers. Returns the
    layout. (Accelerate's wrapper is unwrapped; an element-wise optimizer is refused.)"""
    client = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer
    if not hasattr(client, "bind_layout"):
        raise TypeError(
            f"bind_fsdp: the optimizer {type(client).__name__} is not layer-wise (it has no "
            "bind_layout); element-wise optimizers need no binding"
        )
    layout = fsdp_layout(client, model)
    client.bind_layout(layout)
    return layout
