"""What a DeepSpeed ZeRO rank's optimizer holds, described as pieces of whole, named layers.

DeepSpeed hands the client optimizer flat fp32 partitions instead of the model's parameters, so a
layer-wise optimizer cannot see a layer's shape or its whole norm. This module reads DeepSpeed's own
bookkeeping once, after ``deepspeed.initialize`` / ``accelerator.prepare``, and builds the
:class:`~tvlars_scale.optim.sharding.ShardedLayout` the optimizer steps by (:func:`bind_zero` binds
it; the checkpoint saves the optimizer state through the same layout). Each
:class:`~tvlars_scale.optim.sharding.Piece` gets its place in the rank's flat partition and its
offset inside its layer, both from the geometry alone, with no collective:

* ZeRO-1/2 (``DeepSpeedZeroOptimizer``): each parameter group is flattened into one buffer -- in
  ``round_robin_gradients`` order when that option is on, with alignment padding between parameters
  when ``parameter_alignment`` is on, and zero padding at the tail -- and rank ``r`` holds the window
  ``[r * partition_size, (r + 1) * partition_size)`` of it. A layer may straddle two windows; a
  piece's layer offset is where the window cuts into the layer's extent in the buffer.
* ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): every parameter is split on its own into
  ``world_size`` slots of ``ceil(numel / world_size)`` elements, and a rank's flat tensor for a
  sub-group is its slot of every parameter, in order: rank ``r``'s piece starts at element
  ``r * slot_numel`` of its layer. The last slots end in uninitialised memory, and a parameter smaller
  than the world size leaves some ranks nothing but padding.
* bf16 with fp32 gradient accumulation at ZeRO-1 (``BF16_Optimizer``): like ZeRO-1, parameters back
  to back in their group's order.

Pieces never cover padding, so the norms the optimizer all-reduces are exactly the whole layers'.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .sharding import Piece, ShardedLayout, TensorLayout

__all__ = [
    "bind_zero",
    "find_zero_optimizer",
    "flat_window_pieces",
    "split_param_pieces",
    "zero_layout",
]


def flat_window_pieces(
    extents: Iterable[tuple[int, int, int]], window_start: int, window_numel: int
) -> tuple[Piece, ...]:
    """ZeRO-1/2: the pieces of a flat buffer's layers that fall inside one rank's window.

    ``extents`` are ``(layer, offset in the flat buffer, numel)``; whatever they leave uncovered is
    padding. Piece starts are relative to the window, i.e. offsets into the rank's partition; layer
    offsets are relative to the layer's extent.
    """
    window_end = window_start + window_numel
    pieces = []
    for layer, offset, numel in sorted(extents, key=lambda extent: extent[1]):
        first, last = max(offset, window_start), min(offset + numel, window_end)
        if first < last:
            pieces.append(
                Piece(layer, first - window_start, last - first, layer_offset=first - offset)
            )
    return tuple(pieces)


def split_param_pieces(params: Iterable[tuple[int, int, int]], rank: int) -> tuple[Piece, ...]:
    """ZeRO-3: the pieces of a sub-group's flat partition on ``rank``.

    ``params`` are ``(layer, numel, slot_numel)`` in the sub-group's order: each parameter occupies
    ``slot_numel`` elements of the flat partition on every rank, of which rank ``r`` fills the ones
    holding elements ``[r * slot_numel, (r + 1) * slot_numel)`` of the parameter that exist: its
    piece starts at element ``r * slot_numel`` of the layer.
    """
    pieces = []
    offset = 0
    for layer, numel, slot_numel in params:
        valid = min(slot_numel, max(0, numel - rank * slot_numel))
        if valid > 0:
            pieces.append(Piece(layer, offset, valid, layer_offset=rank * slot_numel))
        offset += slot_numel
    return tuple(pieces)


def find_zero_optimizer(obj):
    """The DeepSpeed ZeRO optimizer behind ``obj``, or ``None`` when DeepSpeed does not shard.

    ``obj`` may be the ``DeepSpeedEngine`` (what ``deepspeed.initialize`` and ``accelerator.prepare``
    return for the model), Accelerate's ``DeepSpeedEngineWrapper`` / ``DeepSpeedOptimizerWrapper``, or
    the ZeRO optimizer itself. ``None`` means the engine steps the client optimizer directly (ZeRO
    stage 0 in fp32): it holds the model's own parameters and needs no layout. bf16 with fp32 gradient
    accumulation makes DeepSpeed partition through ``BF16_Optimizer``, which is handled like ZeRO-1.
    """
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    sharding = (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer)
    current = obj
    # Unwrap at most: DeepSpeedEngineWrapper -> engine -> ZeRO optimizer.
    for _ in range(3):
        if isinstance(current, sharding):
            return current
        if isinstance(current, DeepSpeedEngine):
            if hasattr(current.optimizer, "bind_layout"):
                return None  # ZeRO-0 in fp32: the client itself steps the model's parameters
            current = current.optimizer
        elif isinstance(getattr(current, "engine", None), DeepSpeedEngine):
            current = current.engine  # Accelerate's DeepSpeedEngineWrapper
        elif hasattr(current, "optimizer"):
            current = current.optimizer  # Accelerate's DeepSpeedOptimizerWrapper
        else:
            break
    raise TypeError(
        f"bind_zero: no DeepSpeed ZeRO stage 1/2/3 optimizer found in {type(obj).__name__} (reached "
        f"{type(current).__name__}); pass the engine returned by deepspeed.initialize or the model / "
        "optimizer returned by accelerator.prepare"
    )


def zero_layout(zero_optimizer) -> ShardedLayout:
    """The layout of what this rank's ZeRO-1/2/3 optimizer hands its client optimizer."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if isinstance(zero_optimizer, DeepSpeedZeroOptimizer_Stage3):
        return _stage3_layout(zero_optimizer)
    if isinstance(zero_optimizer, BF16_Optimizer):
        return _bf16_layout(zero_optimizer)
    return _stage_1_and_2_layout(zero_optimizer)


def bind_zero(obj) -> ShardedLayout | None:
    """Bind a layer-wise client optimizer to the DeepSpeed engine that shards it; call once after
    ``deepspeed.initialize`` / ``accelerator.prepare``. Returns the layout (``None`` at ZeRO stage 0,
    where the optimizer steps whole parameters and needs none)."""
    zero_optimizer = find_zero_optimizer(obj)
    if zero_optimizer is None:
        return None
    client = zero_optimizer.optimizer
    if not hasattr(client, "bind_layout"):
        raise TypeError(
            f"bind_zero: the client optimizer {type(client).__name__} is not layer-wise (it has no "
            "bind_layout); element-wise optimizers need no binding"
        )
    layout = zero_layout(zero_optimizer)
    client.bind_layout(layout)
    return layout


def _stage_1_and_2_layout(zero_optimizer) -> ShardedLayout:
    groups = zero_optimizer.bit16_groups
    flat_orders = zero_optimizer.round_robin_bit16_groups
    return _flat_partitions_layout(
        zero_optimizer,
        groups,
        extents=[_flat_extents(zero_optimizer, i, order) for i, order in enumerate(flat_orders)],
        partitions=zero_optimizer.single_partition_of_fp32_groups,
        partition_sizes=[int(size) for size in zero_optimizer.partition_size],
    )


def _bf16_layout(zero_optimizer) -> ShardedLayout:
    """ZeRO-1 with bf16 weights and fp32 gradient accumulation: ``BF16_Optimizer``, parameters back to
    back in their group's order, the tail padded to a multiple of 2 x world size."""
    world_size = _world_size(zero_optimizer.real_dp_process_group[0])
    groups = zero_optimizer.bf16_groups
    return _flat_partitions_layout(
        zero_optimizer,
        groups,
        extents=[_back_to_back(params) for params in groups],
        partitions=zero_optimizer.fp32_groups_flat_partition,
        partition_sizes=[flat.numel() // world_size for flat in zero_optimizer.bf16_groups_flat],
    )


def _flat_partitions_layout(
    zero_optimizer, groups, extents, partitions, partition_sizes
) -> ShardedLayout:
    """ZeRO-1/2: group ``i``'s parameters lie at ``extents[i]`` = ``[(param, offset)]`` in one flat
    buffer, of which this rank's fp32 copy of ``[rank * size, (rank + 1) * size)`` is ``partitions[i]``."""
    import deepspeed.comm as ds_dist

    names, shapes, tensors = [], [], []
    process_group = _single_group(zero_optimizer.real_dp_process_group)
    rank = ds_dist.get_rank(group=process_group)
    for i, params in enumerate(groups):
        layer_of = _register_layers(zero_optimizer, params, names, shapes, lambda p: tuple(p.shape))
        _check_numel(partitions[i], partition_sizes[i], f"param group {i}")
        pieces = flat_window_pieces(
            [(layer_of[id(p)], offset, p.numel()) for p, offset in extents[i]],
            window_start=rank * partition_sizes[i],
            window_numel=partition_sizes[i],
        )
        tensors.append((partitions[i], TensorLayout(tuple(layer_of.values()), pieces)))
    return ShardedLayout(names, shapes, tensors, process_group)


def _stage3_layout(zero_optimizer) -> ShardedLayout:
    import deepspeed.comm as ds_dist

    names, shapes, tensors = [], [], []
    # DeepSpeed 0.16 shards every sub-group over its one data-parallel group.
    process_groups = getattr(zero_optimizer, "sub_group_process_groups", None)
    process_group = _single_group(process_groups or [zero_optimizer.dp_process_group])
    rank = ds_dist.get_rank(group=process_group)
    for i, params in enumerate(zero_optimizer.fp16_groups):
        # ZeRO-3 replaces each parameter's data by an empty tensor; ds_shape keeps the original shape.
        layer_of = _register_layers(
            zero_optimizer, params, names, shapes, lambda p: tuple(p.ds_shape)
        )
        partition = zero_optimizer.fp32_partitioned_groups_flat[i]
        slots = [(layer_of[id(p)], p.ds_numel, p.partition_numel()) for p in params]
        _check_numel(partition, sum(slot for _, _, slot in slots), f"sub-group {i}")
        pieces = split_param_pieces(slots, rank)
        tensors.append((partition, TensorLayout(tuple(layer_of.values()), pieces)))
    return ShardedLayout(names, shapes, tensors, process_group)


def _register_layers(zero_optimizer, params, names, shapes, original_shape) -> dict[int, int]:
    """Append ``params`` as new layers; return ``id(param) -> global layer index`` in their order."""
    param_names = getattr(zero_optimizer, "param_names", None) or {}
    layer_of = {}
    for p in params:
        layer_of[id(p)] = len(names)
        names.append(param_names.get(p, f"layer{len(names)}"))
        shapes.append(original_shape(p))
    return layer_of


def _single_group(process_groups: Sequence):
    """The one process group all partitions are sharded over (MoE expert groups are not supported)."""
    first = process_groups[0]
    if any(group is not first for group in process_groups):
        raise NotImplementedError(
            "bind_zero: parameter groups sharded over different process groups (MoE expert "
            "parallelism) are not supported"
        )
    return first


def _flat_extents(zero_optimizer, group_index: int, flat_order) -> list[tuple]:
    """``(param, offset)`` in a ZeRO-1/2 group's flat buffer, in ``round_robin_gradients`` order."""
    offsets = getattr(zero_optimizer, "round_robin_bit16_offsets", None)
    if offsets is None:  # DeepSpeed 0.16 has no per-parameter alignment padding
        return _back_to_back(flat_order)
    return list(zip(flat_order, offsets[group_index], strict=True))


def _back_to_back(params) -> list[tuple]:
    extents, offset = [], 0
    for p in params:
        extents.append((p, offset))
        offset += p.numel()
    return extents


def _world_size(process_group) -> int:
    import deepspeed.comm as ds_dist

    return ds_dist.get_world_size(group=process_group)


def _check_numel(partition: torch.Tensor, expected: int, where: str) -> None:
    # Guards against DeepSpeed changing its internal layout under us: a mismatch would mis-assign layers.
    if partition.numel() != expected:
        raise RuntimeError(
            f"bind_zero: {where} partition holds {partition.numel()} elements, the layout derived from "
            f"DeepSpeed's bookkeeping expects {expected}; this DeepSpeed version is not supported"
        )
