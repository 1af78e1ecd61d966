"""Machinery shared by the layer-wise optimizers: buckets of pieces, state, one norm reduction, dispatch.

A ``step()`` call runs in two phases around :func:`~tvlars_scale.optim.sharding.layer_norms`:

1. per bucket (tensors of one group that share the adaptation flag and the step count), the algorithm
   computes its update direction; the norms of the weights and of the trust-ratio denominator are taken
   per piece;
2. the per-layer norms (reduced over ranks when sharded) give one trust ratio per layer, gathered back
   to one 0-dim tensor per piece, and the algorithm applies the update.

Without a bound :class:`~tvlars_scale.optim.sharding.ShardedLayout` every parameter is one layer and
one piece. With one, the optimizer steps DeepSpeed's flat partitions, or FSDP2's row shards, as pieces
of named layers; the bound layout is exposed as :attr:`LayerwiseOptimizer.layout` (the checkpoint
saves through it). Sharded DTensors without a layout are refused (their local norms are wrong).

The algorithm hooks and the :mod:`.functional` helpers take the tensor lists positionally and
everything else by keyword.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.optim import Optimizer

from .functional import FOREACH, LOOP
from .sharding import ShardedLayout, layer_norms, local_tensor

__all__ = ["LayerwiseOptimizer"]

# Elements per chunk on the CPU (16 MB of fp32 per tensor list): the best of 2^16..2^22 measured on
# resnet50's parameters here (benchmarks/optimizer_step.py).
CPU_CHUNK_NUMEL = 1 << 20


@dataclass
class _Bucket:
    group: dict
    adapted: bool  # trust ratio applied (else 1)
    decayed: bool  # group weight decay applied (else 0)
    step_offset: int
    params: list[torch.Tensor] = field(default_factory=list)
    spans: list[tuple[int, int] | None] = field(
        default_factory=list
    )  # (start, numel); None = whole
    layer_positions: list[int] = field(
        default_factory=list
    )  # index of each piece's layer in the call
    names: list[str] = field(default_factory=list)
    numels: list[int] = field(default_factory=list)
    layer_index: torch.Tensor | None = None  # layer_positions on the device, built once
    chunk_cache: tuple | None = None
    scratch_views: dict = field(default_factory=dict)  # chunk start -> (scratch buffer, its views)
    directions: dict = field(default_factory=dict)  # chunk start -> kept direction tensors (CPU)

    def views(self, tensors: list[torch.Tensor], chunk: slice) -> list[torch.Tensor]:
        """The pieces of ``tensors`` (those of ``params[chunk]``) that this rank steps (of a
        DTensor: of its local shard)."""
        return [
            local_tensor(t) if span is None else local_tensor(t).view(-1).narrow(0, *span)
            for t, span in zip(tensors, self.spans[chunk], strict=True)
        ]

    def chunks(self, max_numel: float) -> list[slice]:
        """Consecutive runs of pieces of at most ``max_numel`` elements (a larger piece runs alone)."""
        if self.chunk_cache is None or self.chunk_cache[0] != max_numel:
            runs, begin, numel = [], 0, 0
            for index, size in enumerate(self.numels):
                if index > begin and numel + size > max_numel:
                    runs.append(slice(begin, index))
                    begin, numel = index, 0
                numel += size
            runs.append(slice(begin, len(self.numels)))
            self.chunk_cache = (max_numel, runs)
        return self.chunk_cache[1]


@dataclass
class _CallLayers:
    """Layers of a sharded call that share a group, the adaptation flag and the step offset: every
    layer of the call, also those this rank holds no piece of, whose norms the all-reduce gives
    every rank. Their statistics are recorded from the reduced norms, so any one rank holds them
    all and a log step needs no gather."""

    group: dict
    adapted: bool
    step_offset: int
    names: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # in the call's norm vector
    index: torch.Tensor | None = None  # positions on the device, built once


@dataclass
class _Plan:
    buckets: list[_Bucket]
    device: torch.device
    num_layers: int
    piece_to_layer: torch.Tensor | None  # None: pieces are whole layers, nothing to reduce
    # Tensors of which this rank holds no piece (FSDP2: a layer with fewer rows than ranks):
    # nothing to update, but their step counters advance with their layers'.
    pieceless: list[torch.Tensor] = field(default_factory=list)
    call_layers: list[_CallLayers] = field(default_factory=list)  # sharded calls only


@dataclass
class LayerStats:
    """One step call's per-layer statistics, kept as device tensors (no host sync to record them)."""

    names: list[str]
    weight_norm: torch.Tensor
    update_norm: torch.Tensor
    trust_ratio: torch.Tensor


class LayerwiseOptimizer(Optimizer):
    """Base class: subclasses define ``_buffers``, ``_direction``, ``_trust`` and ``_apply``."""

    _buffers: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, *, foreach: bool | None = None) -> None:
        defaults = {"adapt": True, "exclude_1d": True, **defaults}
        self._constructed = (
            set()
        )  # ids of the tensors we were given, to recognise ZeRO's flat partitions
        super().__init__(params, defaults)
        self.foreach = foreach
        self._layout: ShardedLayout | None = None
        self._plans: dict = {}  # ids of a call's tensors -> (their step offsets, the plan)
        self._scratch_buffers: dict = {}  # (device, dtype) -> flat buffer; not optimizer state
        self.telemetry: dict[tuple[str, ...], LayerStats] = {}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        if any(p.is_complex() for p in params):
            self.param_groups.pop()  # refused whole, as torch refuses a group with a repeated tensor
            raise ValueError(
                f"{type(self).__name__} does not support complex parameters (the layer norms and "
                "the moments are defined for real tensors); optimize torch.view_as_real(p) instead"
            )
        self._constructed.update(id(p) for p in params)

    @property
    def layout(self) -> ShardedLayout | None:
        """The layout bound by :meth:`bind_layout` (``None``: the optimizer steps whole parameters)."""
        return self._layout

    def bind_layout(self, layout: ShardedLayout | None) -> None:
        """Step sharded tensors as pieces of whole layers (see ``tvlars_scale.optim.zero_layout``);
        ``None`` unbinds. A whole-layers layout (nothing sharded) is refused: its norms are local."""
        if layout is not None and not layout.sharded:
            raise ValueError(
                "bind_layout: the layout describes whole, unsharded parameters; an optimizer stepping "
                "its own parameters needs no layout (bind None)"
            )
        self._layout = layout
        self._plans.clear()

    # --- algorithm hooks ---------------------------------------------------------------------------
    def _direction(
        self, w, g, states, *, group, ops, weight_decay, step, out
    ):  # pragma: no cover - abstract
        """Write the update direction into ``out``; return ``(d, x)``: the direction and the tensors
        whose norms enter the trust ratio. ``states`` maps each of ``_buffers`` to its tensor list."""
        raise NotImplementedError

    def _trust(
        self, weight_norm, update_norm, *, group, step
    ) -> torch.Tensor:  # pragma: no cover - abstract
        """One trust ratio per piece from its layer's weight and update norms."""
        raise NotImplementedError

    def _apply(self, w, d, states, trust, *, group, ops, step) -> None:  # pragma: no cover
        """Apply the update; ``trust`` holds one trust ratio per tensor of ``w``."""
        raise NotImplementedError

    # --- step --------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan, base_step = self._plan()
        if plan is None:
            return loss
        ops, chunk_numel = self._execution(plan)
        if plan.piece_to_layer is None:
            self._step_whole_layers(plan, base_step, ops, chunk_numel)
        else:
            self._step_sharded(plan, base_step, ops, chunk_numel)
        for p in plan.pieceless:
            self.state[p]["step"] += 1
        return loss

    def _step_whole_layers(self, plan: _Plan, base_step: int, ops, chunk_numel: int) -> None:
        """Every norm is local: finish each chunk of tensors while it is still in cache."""
        for bucket in plan.buckets:
            step = base_step + bucket.step_offset
            norms = []
            for chunk in bucket.chunks(chunk_numel):
                w, g, states = self._tensors(bucket, chunk)
                out = self._scratch(bucket, chunk, w)
                d, x = self._bucket_direction(bucket, w, g, states, ops=ops, step=step, out=out)
                weight_norm, update_norm = layer_norms(
                    _piece_squares(w, x, ops=ops), None, num_layers=len(w), process_group=None
                )
                norms.append(
                    self._finish(bucket, w, d, states, weight_norm, update_norm, ops=ops, step=step)
                )
            self._count_step(bucket, step)
            parts = zip(*norms, strict=True)
            self._record(bucket.names, *(torch.cat(p) for p in parts))

    def _step_sharded(self, plan: _Plan, base_step: int, ops, chunk_numel: int) -> None:
        """Directions and piece norms first, then one reduction for the whole call, then updates."""
        pending, piece_squares = [], []
        for bucket in plan.buckets:
            step = base_step + bucket.step_offset
            for chunk in bucket.chunks(chunk_numel):
                w, g, states = self._tensors(bucket, chunk)
                # Every direction must outlive the reduction: not the shared scratch.
                out = self._directions(bucket, chunk, w)
                d, x = self._bucket_direction(bucket, w, g, states, ops=ops, step=step, out=out)
                piece_squares.append(_piece_squares(w, x, ops=ops))
                pending.append((bucket, chunk, step, w, d, states))
        # A rank may hold only padding of this (sub-)group: no pieces, zeros for every layer.
        weight_norm, update_norm = layer_norms(
            torch.cat(piece_squares, dim=1) if piece_squares else None,
            plan.piece_to_layer,
            num_layers=plan.num_layers,
            process_group=self._layout.process_group,
        )
        for bucket, chunk, step, w, d, states in pending:
            layers = bucket.layer_index[chunk]
            self._finish(
                bucket,
                w,
                d,
                states,
                weight_norm.index_select(0, layers),
                update_norm.index_select(0, layers),
                ops=ops,
                step=step,
            )
        for bucket in plan.buckets:
            self._count_step(bucket, base_step + bucket.step_offset)
        for layers in plan.call_layers:
            layer_weight_norm = weight_norm.index_select(0, layers.index)
            layer_update_norm = update_norm.index_select(0, layers.index)
            trust = self._layer_trust(
                layers.adapted,
                layer_weight_norm,
                layer_update_norm,
                group=layers.group,
                step=base_step + layers.step_offset,
            )
            self._record(layers.names, layer_weight_norm, layer_update_norm, trust)

    def _directions(
        self, bucket: _Bucket, chunk: slice, like: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Where a sharded step writes one chunk's directions, all alive until the reduction. On
        the CPU they are kept between steps (a whole shard's worth allocated afresh every step
        faults in every page: 77 -> 45 ms for resnet18's FSDP2 step on one rank); on accelerators the caching allocator
        makes fresh tensors free, and nothing is held between steps."""
        if like[0].device.type != "cpu":
            return [torch.empty_like(t) for t in like]
        kept = bucket.directions.get(chunk.start)
        if kept is None or any(k.shape != t.shape for k, t in zip(kept, like, strict=True)):
            kept = bucket.directions[chunk.start] = [torch.empty_like(t) for t in like]
        return kept

    def _scratch(
        self, bucket: _Bucket, chunk: slice, like: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Views of one persistent buffer shaped like ``like``: a chunk's direction is written into
        memory that the previous chunk (and step) used, which stays in cache and never page-faults.
        The views are kept per chunk (cutting them anew was a tenth of the step's fixed cost)."""
        key = (like[0].device, like[0].dtype)
        buffer = self._scratch_buffers.get(key)
        cached = bucket.scratch_views.get(chunk.start)
        if cached is not None and cached[0] is buffer:
            return cached[1]
        sizes = [t.numel() for t in like]
        numel = sum(sizes)
        if buffer is None or buffer.numel() < numel:
            buffer = self._scratch_buffers[key] = torch.empty(numel, device=key[0], dtype=key[1])
        views = [view.view_as(t) for view, t in zip(buffer[:numel].split(sizes), like, strict=True)]
        bucket.scratch_views[chunk.start] = (buffer, views)
        return views

    def _tensors(self, bucket: _Bucket, chunk: slice):
        params = bucket.params[chunk]
        states = {k: bucket.views([self.state[p][k] for p in params], chunk) for k in self._buffers}
        return bucket.views(params, chunk), bucket.views([p.grad for p in params], chunk), states

    def _bucket_direction(self, bucket: _Bucket, w, g, states, *, ops, step, out):
        """:meth:`_direction` with the bucket's group and weight decay (none when not decayed)."""
        weight_decay = bucket.group["weight_decay"] if bucket.decayed else 0.0
        return self._direction(
            w, g, states, group=bucket.group, ops=ops, weight_decay=weight_decay, step=step, out=out
        )

    def _finish(self, bucket, w, d, states, weight_norm, update_norm, *, ops, step):
        """Apply the update; returns the norms and trust ratios it used."""
        trust = self._layer_trust(
            bucket.adapted, weight_norm, update_norm, group=bucket.group, step=step
        )
        self._apply(w, d, states, trust, group=bucket.group, ops=ops, step=step)
        return weight_norm, update_norm, trust

    def _layer_trust(self, adapted: bool, weight_norm, update_norm, *, group, step):
        if adapted:
            return self._trust(weight_norm, update_norm, group=group, step=step)
        return torch.ones_like(weight_norm)

    def _count_step(self, bucket: _Bucket, step: int) -> None:
        for p in bucket.params:
            self.state[p]["step"] = step + 1

    def _record(self, names: list[str], weight_norm, update_norm, trust) -> None:
        self.telemetry[tuple(names)] = LayerStats(names, weight_norm, update_norm, trust)

    def layer_stats(self) -> dict[str, dict[str, float]]:
        """The last step's per-layer norms and trust ratios, by layer name."""
        stats: dict[str, dict[str, float]] = {}
        for record in self.telemetry.values():
            # host sync: copies the recorded device tensors to the host; call it only when logging.
            values = torch.stack(
                [record.weight_norm, record.update_norm, record.trust_ratio]
            ).tolist()
            for name, w, u, t in zip(record.names, *values, strict=True):
                stats[name] = {"weight_norm": w, "update_norm": u, "trust_ratio": t}
        return stats

    # --- planning ----------------------------------------------------------------------------------
    def _execution(self, plan: _Plan):
        """The executor and the chunk size (elements) it works through the tensors by."""
        if self.foreach is False:
            return (
                LOOP,
                0,
            )  # one tensor at a time, every op on it before the next, like torch's loop
        if plan.device.type == "cpu":
            # On the CPU the update is memory bound: working through bounded chunks, every op on a
            # chunk before the next, lets one chunk's temporaries (d) be reused by the next instead
            # of faulting in a whole model's worth, and bounds the step's peak memory.
            return FOREACH, CPU_CHUNK_NUMEL
        return FOREACH, math.inf  # accelerators: fewest launches, one list per op

    def _plan(self) -> tuple[_Plan | None, int]:
        """Group this call's tensors into buckets of pieces; cached while the call's shape is stable."""
        entries = []
        for group_index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    for key in self._buffers:
                        state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                entries.append((group_index, p, state["step"]))
        if not entries:
            return None, 0
        base_step = min(step for _, _, step in entries)
        # One plan per set of tensors stepped together: DeepSpeed calls step() once per parameter
        # group (ZeRO-1/2) or sub-group (ZeRO-3), so one cached plan would be rebuilt, with its
        # index tensors copied to the device, on every call. The tensors are held by the param
        # groups (or the bound layout), so their ids are stable and the entries do not pile up.
        key = tuple(id(p) for _, p, _ in entries)
        offsets = tuple(step - base_step for _, _, step in entries)
        cached = self._plans.get(key)
        if cached is None or cached[0] != offsets:
            cached = self._plans[key] = (offsets, self._build_plan(entries, base_step))
        return cached[1], base_step

    def _build_plan(self, entries, base_step: int) -> _Plan:
        layout = self._layout
        buckets: dict[tuple, _Bucket] = {}
        call_layers: dict[int, int] = {}  # global layer id -> position in this call's norm vector
        pieceless = []
        records: dict[tuple, _CallLayers] = {}
        for group_index, p, step in entries:
            group = self.param_groups[group_index]
            pieces = self._pieces(p, group_index, group, layout)
            if not pieces:
                pieceless.append(p)
            if layout is not None:
                for layer in layout.of(p).layers:
                    if layer in call_layers:
                        continue
                    call_layers[layer] = len(call_layers)
                    adapted = group["adapt"] and not _excluded(group, layout.layer_shapes[layer])
                    offset = step - base_step
                    record = records.setdefault(
                        (group_index, adapted, offset), _CallLayers(group, adapted, offset)
                    )
                    record.names.append(layout.layer_names[layer])
                    record.positions.append(call_layers[layer])
            for layer, name, shape, span in pieces:
                position = call_layers.setdefault(layer, len(call_layers))
                excluded = _excluded(group, shape)
                adapted = group["adapt"] and not excluded
                bucket = buckets.setdefault(
                    (group_index, adapted, not excluded, step - base_step),
                    _Bucket(group, adapted, not excluded, step - base_step),
                )
                bucket.params.append(p)
                bucket.spans.append(span)
                bucket.layer_positions.append(position)
                bucket.names.append(name)
                bucket.numels.append(p.numel() if span is None else span[1])
        ordered = list(buckets.values())
        sharded = layout is not None
        if not sharded:
            # Whole tensors are layers: number them in the order their norms are stacked.
            positions = iter(range(len(entries)))
            for bucket in ordered:
                bucket.layer_positions = [next(positions) for _ in bucket.params]
        device = entries[0][1].device
        piece_to_layer: list[int] = []
        for bucket in ordered:
            bucket.layer_index = torch.tensor(
                bucket.layer_positions, dtype=torch.long, device=device
            )
            piece_to_layer += bucket.layer_positions
        for record in records.values():
            record.index = torch.tensor(record.positions, dtype=torch.long, device=device)
        return _Plan(
            buckets=ordered,
            device=device,
            num_layers=len(call_layers),
            piece_to_layer=(
                torch.tensor(piece_to_layer, dtype=torch.long, device=device) if sharded else None
            ),
            pieceless=pieceless,
            call_layers=list(records.values()),
        )

    def _pieces(self, p, group_index, group, layout):
        """``(layer id, name, original shape, span)`` for each piece of ``p`` this rank holds."""
        if layout is None:
            if _is_sharded_dtensor(p):
                raise RuntimeError(
                    f"{type(self).__name__} is stepping a sharded DTensor (FSDP2) of shape "
                    f"{tuple(p.shape)} and no layout describes it: norms of its local shard would "
                    "be silently wrong. Call tvlars_scale.optim.bind_fsdp(optimizer, model) after "
                    "fully_shard() / accelerator.prepare()."
                )
            if id(p) not in self._constructed:
                raise RuntimeError(
                    f"{type(self).__name__} is stepping a tensor it was not constructed with (a DeepSpeed "
                    "ZeRO flat partition?) and no layout describes it: per-layer norms of a shard would "
                    "be silently wrong. Call tvlars_scale.optim.bind_zero(engine) after "
                    "accelerator.prepare() / deepspeed.initialize()."
                )
            names = group.get("param_names")
            index = next(i for i, q in enumerate(group["params"]) if q is p)
            name = names[index] if names else f"group{group_index}.param{index}"
            return [(id(p), name, tuple(p.shape), None)]
        entry = layout.of(p)
        if entry is None:
            raise RuntimeError(
                f"the bound layout does not describe a tensor of shape {tuple(p.shape)} in group "
                f"{group_index}: rebind after the engine is built (tvlars_scale.optim.bind_zero)"
            )
        return [
            (
                piece.layer,
                layout.layer_names[piece.layer],
                layout.layer_shapes[piece.layer],
                (piece.start, piece.numel),
            )
            for piece in entry.pieces
        ]


def _excluded(group: dict, shape: tuple[int, ...]) -> bool:
    """Excluded from adaptation and weight decay: decided by the layer's ORIGINAL shape, never by a
    flat partition's."""
    return group["exclude_1d"] and len(shape) <= 1


def _is_sharded_dtensor(tensor: torch.Tensor) -> bool:
    # Read from the placements without importing DTensor: a tensor holding part of its values.
    placements = getattr(tensor, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)


def _piece_squares(w: list[torch.Tensor], x: list[torch.Tensor], *, ops) -> torch.Tensor:
    """The ``2 x P`` matrix :func:`layer_norms` reads: squared norms of the weights, then of ``x``."""
    return ops.sum_of_squares(w + x).view(2, len(w))
