"""Optimizer state and fp32 master weights saved per named layer, so they load at any world size.

What an optimizer steps depends on the parallel setting: the model's own parameters (one process,
DDP, ZeRO stage 0), DeepSpeed ZeRO's flat fp32 partitions, in which a layer may be cut between
two ranks, or FSDP2's DTensors, whose local shards are blocks of rows. All are described by the
:class:`~tvlars_scale.optim.sharding.ShardedLayout` the optimizer steps by: under ZeRO / FSDP2 the
very layout it is bound to (``bind_zero`` / ``bind_fsdp``), otherwise
:func:`unsharded_layout`, every parameter one whole named layer. Each
:class:`~tvlars_scale.optim.sharding.Piece` says where a run of a layer lies in the stepped tensor
and where in the layer (``layer_offset``). Saving writes every piece this rank owns, with its layer
offset; loading, under any other layout, copies each piece it needs from the overlapping saved runs.
The saved form depends on the layers alone, never on the world size or the ZeRO stage, so a
checkpoint of 2 ZeRO-2 ranks loads on 1 process without DeepSpeed, on 3, or under FSDP2, and back.
HSDP replicas hold the same pieces: only replica 0 writes them (``layout.replica_rank``).

Per-tensor state that is not elementwise (the layer-wise optimizers' ``step`` counter, a Python
int; 0-dim tensors) is saved per layer. Under ZeRO one partition carries one value for all its
layers, so on loading the layers that share a partition must agree; they always do when the
checkpoint came from a run where those layers were stepped together.

A moving average of the weights (:mod:`tvlars_scale.training.ema`), one fp32 buffer per stepped
tensor, travels in the same runs (``"ema"`` beside ``"weights"``), so it moves between world sizes
and engines like them; payloads without it (EMA off, older checkpoints) still load.

DeepSpeed's universal-checkpoint converter knows Adam's state only (DeepSpeed issue 8608); this
needs nothing from the optimizer but ``optimizer.state``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from tvlars_scale.optim.sharding import Piece, ShardedLayout, local_tensor

__all__ = ["capture_layer_state", "restore_layer_state", "same_values", "unsharded_layout"]


def unsharded_layout(model: nn.Module, optimizer: torch.optim.Optimizer) -> ShardedLayout:
    """The optimizer steps the model's own parameters: each one a whole layer, named as in
    ``model``, in the optimizer's order. Every rank holds all of them."""
    names = {id(p): name for name, p in model.named_parameters()}
    named = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:
                raise ValueError(
                    f"the optimizer steps a tensor of shape {tuple(p.shape)} that is not a parameter "
                    "of the model"
                )
            named.append((name, p))
    return ShardedLayout.whole_layers(named)


def _is_elementwise(value, tensor: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape == tensor.shape


def _run_of(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    # An FSDP2 DTensor's pieces index its local shard. Runs follow the logical (NCHW) order, so a
    # checkpoint does not depend on the layout: a channels_last weight (model.channels_last) is not
    # contiguous, and reshape copies it (it is a whole-tensor piece; sharded pieces are flat views).
    return local_tensor(tensor).reshape(-1).narrow(0, piece.start, piece.numel)


def _copy_run(tensor: torch.Tensor, piece: Piece, where: slice, values: torch.Tensor) -> None:
    """``values`` into elements ``where`` of ``piece``'s run of ``tensor``, in logical order."""
    run = _run_of(tensor, piece)
    run[where].copy_(values)
    local = local_tensor(tensor)
    if not local.is_contiguous():  # run was a copy of a channels_last tensor: write it back
        local.copy_(run.view(local.shape))


def capture_layer_state(
    optimizer: torch.optim.Optimizer,
    layout: ShardedLayout,
    *,
    owner: bool,
    ema: Mapping[int, torch.Tensor] | None = None,
) -> dict:
    """This rank's part of the optimizer state and master weights, by layer (see module docstring).

    ``owner``: whether this rank writes its pieces -- every rank when the layout is sharded, rank 0
    alone when every rank holds the same whole parameters. ``ema``: ``id(tensor)`` -> its moving
    average, for each of ``layout``'s tensors (saved in each run as ``"ema"``). Every piece is
    cloned: saving a view would write the whole flat partition behind it.
    """
    payload: dict = {"shapes": {}, "scalars": {}, "state_keys": {}, "runs": []}
    if not owner:
        return payload
    names = layout.layer_names
    payload["shapes"] = {
        name: list(shape) for name, shape in zip(names, layout.layer_shapes, strict=True)
    }
    for tensor, entry in layout.items():
        state = optimizer.state.get(tensor, {})
        scalars = {k: v for k, v in state.items() if not _is_elementwise(v, tensor)}
        elementwise = {k: v for k, v in state.items() if _is_elementwise(v, tensor)}
        if state:
            for layer in entry.layers:
                payload["scalars"][names[layer]] = {
                    k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()
                }
                # Named even where this rank holds no piece of the layer: a rank restoring an
                # empty shard of it from this file alone still gets every buffer (empty), so all
                # ranks' optimizer states have the same keys (DTensor state ops are collectives).
                payload["state_keys"][names[layer]] = sorted(elementwise)
        for piece in entry.pieces:
            run = {
                "layer": names[piece.layer],
                "offset": piece.layer_offset,
                "numel": piece.numel,
                "weights": _run_of(tensor.detach(), piece).float().clone(),
                "state": {k: _run_of(v, piece).clone() for k, v in elementwise.items()},
            }
            if ema is not None:
                run["ema"] = _run_of(ema[id(tensor)], piece).clone()
            payload["runs"].append(run)
    return payload


_EMA = ("ema",)
"""The coverage key of the moving average (a tuple: never an optimizer state key)."""


class _Target:
    """One piece this rank restores, and how many of its elements the checkpoint gave so far."""

    def __init__(self, tensor: torch.Tensor, piece: Piece):
        self.tensor, self.piece = tensor, piece
        # key (None: the weights, _EMA: the moving average) -> count
        self.covered: dict[str | tuple | None, int] = defaultdict(int)


class _Merge:
    """Saved payloads merged into this rank's layout one at a time, so each can be released as soon
    as it is merged; :meth:`finish` checks that everything this rank holds was given."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        layout: ShardedLayout,
        ema: Mapping[int, torch.Tensor] | None = None,
    ):
        self.optimizer, self.layout, self.ema = optimizer, layout, ema
        names = layout.layer_names
        self.current = dict(zip(names, layout.layer_shapes, strict=True))
        self.targets: dict[str, list[_Target]] = defaultdict(list)
        for tensor, entry in layout.items():
            for piece in entry.pieces:
                self.targets[names[piece.layer]].append(_Target(tensor, piece))
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.scalars: dict[str, dict] = {}
        self.state_keys: dict[str, set[str]] = defaultdict(set)
        self.state: dict[int, dict[str, torch.Tensor]] = defaultdict(
            dict
        )  # id(tensor) -> key -> buffer

    def add(self, payload: dict) -> None:
        for layer, shape in payload["shapes"].items():
            if self.shapes.setdefault(layer, tuple(shape)) != tuple(shape):
                raise ValueError(f"checkpoint ranks disagree on the shape of {layer}")
        for layer, values in payload["scalars"].items():
            known = self.scalars.setdefault(layer, values)
            if not same_values(known, values):
                raise ValueError(f"checkpoint ranks disagree on the optimizer state of {layer}")
        for layer, keys in payload.get("state_keys", {}).items():  # absent before format 2
            self.state_keys[layer].update(keys)
        for run in payload["runs"]:
            layer = run["layer"]
            self.state_keys[layer].update(run["state"])
            if self.current.get(layer) != self.shapes.get(layer):
                continue  # :meth:`finish` names the mismatch; nothing is copied into a wrong shape
            for target in self.targets.get(layer, ()):
                self._copy(run, target)

    def _copy(self, saved: dict, target: _Target) -> None:
        piece = target.piece
        first, last = piece.layer_offset, piece.layer_offset + piece.numel
        begin, end = max(first, saved["offset"]), min(last, saved["offset"] + saved["numel"])
        if begin >= end:
            return
        destination, source = (
            slice(begin - first, end - first),
            slice(begin - saved["offset"], end - saved["offset"]),
        )
        _copy_run(target.tensor, piece, destination, saved["weights"][source])
        target.covered[None] += end - begin
        if self.ema is not None and "ema" in saved:
            _copy_run(self.ema[id(target.tensor)], piece, destination, saved["ema"][source])
            target.covered[_EMA] += end - begin
        buffers = self.state[id(target.tensor)]
        for key, values in saved["state"].items():
            if key not in buffers:
                # Padding of a flat partition is never read by the layer-wise update: zeros are fine.
                buffers[key] = torch.zeros_like(target.tensor)
            _copy_run(buffers[key], piece, destination, values[source])
            target.covered[key] += end - begin

    def finish(self) -> bool:
        """Check and install; returns whether the moving average was restored (the checkpoint
        holds it for every piece) -- False when it holds none of it."""
        names = self.layout.layer_names
        for layer in sorted(self.current.keys() | self.shapes.keys()):
            if layer not in self.shapes:
                raise ValueError(f"checkpoint has no weights for parameter {layer}")
            if layer not in self.current:
                raise ValueError(
                    f"checkpoint has parameter {layer}, which this model does not have"
                )
            if self.current[layer] != self.shapes[layer]:
                raise ValueError(
                    f"parameter {layer} has shape {list(self.current[layer])} here but "
                    f"{list(self.shapes[layer])} in the checkpoint"
                )
        for layer, targets in self.targets.items():
            for target in targets:
                if target.covered[None] != target.piece.numel:
                    raise ValueError(
                        f"checkpoint holds {target.covered[None]} of the {target.piece.numel} "
                        f"elements of {layer} from element {target.piece.layer_offset} on that "
                        "this rank needs"
                    )
        for tensor, entry in self.layout.items():
            layers = [names[k] for k in entry.layers]
            stepped = [layer for layer in layers if layer in self.scalars]
            if not stepped:  # never stepped when the checkpoint was taken: nothing to restore
                self.optimizer.state.pop(tensor, None)
                continue
            if len(stepped) != len(layers):
                raise ValueError(
                    f"{sorted(set(layers) - set(stepped))} have no optimizer state in the "
                    f"checkpoint but share a partition with {stepped[0]}, which has"
                )
            scalars = self.scalars[stepped[0]]
            for layer in stepped[1:]:
                if not same_values(scalars, self.scalars[layer]):
                    raise ValueError(
                        f"{stepped[0]} and {layer} share one optimizer partition here but have "
                        "different per-tensor optimizer state (step counters) in the checkpoint"
                    )
            buffers = self.state.pop(id(tensor), {})
            for key in set().union(*(self.state_keys[layer] for layer in layers)) - buffers.keys():
                # Padding of a flat partition is never read by the layer-wise update: zeros are fine.
                buffers[key] = torch.zeros_like(tensor)
            for key in buffers:
                for piece in entry.pieces:
                    covered = next(
                        t.covered[key] for t in self.targets[names[piece.layer]] if t.piece is piece
                    )
                    if covered != piece.numel:
                        raise ValueError(
                            f"checkpoint has no optimizer state {key!r} for part of "
                            f"{names[piece.layer]}"
                        )
            state = {k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()}
            self.optimizer.state[tensor] = {**state, **dict(sorted(buffers.items()))}
        return self._ema_restored()

    def _ema_restored(self) -> bool:
        if self.ema is None:
            return False
        targets = [t for targets in self.targets.values() for t in targets]
        given = [t for t in targets if t.covered[_EMA]]
        if not given:
            return False
        for target in targets:
            if target.covered[_EMA] != target.piece.numel:
                raise ValueError(
                    f"checkpoint has the moving average (EMA) of only part of "
                    f"{self.layout.layer_names[target.piece.layer]}"
                )
        return True


def same_values(a: dict, b: dict) -> bool:
    """Whether two dicts of per-tensor state (ints, 0-dim tensors) hold the same values."""
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if torch.is_tensor(x) or torch.is_tensor(y):
            if not (torch.is_tensor(x) and torch.is_tensor(y) and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


@torch.no_grad()
def restore_layer_state(
    optimizer: torch.optim.Optimizer,
    layout: ShardedLayout,
    payloads: Iterable[dict],
    *,
    ema: Mapping[int, torch.Tensor] | None = None,
) -> bool:
    """Load :func:`capture_layer_state` payloads into this rank's ``layout``.

    ``payloads`` may be every rank's, or only those holding what this rank needs (and, for each
    layer, one carrying its per-tensor state); they are merged one at a time as the iterable yields
    them, so a generator that loads each file on demand holds one at once. The master weights are
    copied into the stepped tensors (parameters or fp32 partitions) and the optimizer state is
    replaced. Raises ``ValueError`` naming the layer when a piece is missing, the layers differ from
    the model's, or a partition's layers carry different step counters.

    ``ema`` (as for :func:`capture_layer_state`): the moving averages to fill from the runs' saved
    ``"ema"``; returns whether the checkpoint held it (False: left as it was).
    """
    merge = _Merge(optimizer, layout, ema)
    for payload in payloads:
        merge.add(payload)
    return merge.finish()
