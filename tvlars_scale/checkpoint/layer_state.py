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

DeepSpeed's universal-checkpoint converter knows Adam's state only (DeepSpeed issue 8608); this
needs nothing from the optimizer but ``optimizer.state``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn

from tvlars_scale.optim.sharding import Piece, ShardedLayout, local_tensor

__all__ = ["capture_layer_state", "restore_layer_state", "unsharded_layout"]


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


def capture_layer_state(
    optimizer: torch.optim.Optimizer, layout: ShardedLayout, *, owner: bool
) -> dict:
    """This rank's part of the optimizer state and master weights, by layer (see module docstring).

    ``owner``: whether this rank writes its pieces -- every rank when the layout is sharded, rank 0
    alone when every rank holds the same whole parameters. Every piece is cloned: saving a view would
    write the whole flat partition behind it.
    """
    payload: dict = {"shapes": {}, "scalars": {}, "runs": []}
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
        for piece in entry.pieces:
            payload["runs"].append(
                {
                    "layer": names[piece.layer],
                    "offset": piece.layer_offset,
                    "numel": piece.numel,
                    "weights": _run_of(tensor.detach(), piece).float().clone(),
                    "state": {k: _run_of(v, piece).clone() for k, v in elementwise.items()},
                }
            )
    return payload


class _SavedLayers:
    """The union of every rank's payload, indexed by layer, with its consistency checked."""

    def __init__(self, payloads: Sequence[dict]):
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.scalars: dict[str, dict] = {}
        self.runs: dict[str, list[dict]] = defaultdict(list)
        for payload in payloads:
            for layer, shape in payload["shapes"].items():
                if self.shapes.setdefault(layer, tuple(shape)) != tuple(shape):
                    raise ValueError(f"checkpoint ranks disagree on the shape of {layer}")
            for layer, values in payload["scalars"].items():
                known = self.scalars.setdefault(layer, values)
                if not _same_values(known, values):
                    raise ValueError(f"checkpoint ranks disagree on the optimizer state of {layer}")
            for run in payload["runs"]:
                self.runs[run["layer"]].append(run)
        for layer, shape in self.shapes.items():
            runs = sorted(self.runs.get(layer, []), key=lambda run: run["offset"])
            covered = 0
            for run in runs:
                if run["offset"] != covered:
                    raise ValueError(
                        f"checkpoint is missing elements {covered}..{run['offset']} of {layer}"
                    )
                covered += run["numel"]
            if covered != math.prod(shape):
                raise ValueError(
                    f"checkpoint holds {covered} of the {math.prod(shape)} elements of {layer}"
                )
            self.runs[layer] = runs

    def copy_into(self, target: torch.Tensor, layer: str, piece: Piece, key: str | None) -> None:
        """Fill ``piece`` (of ``layer``) in ``target`` from the saved runs (``key`` None: the
        weights)."""
        first, last = piece.layer_offset, piece.layer_offset + piece.numel
        local = local_tensor(target)
        destination = _run_of(target, piece)
        for saved in self.runs[layer]:
            begin, end = max(first, saved["offset"]), min(last, saved["offset"] + saved["numel"])
            if begin >= end:
                continue
            source = saved["weights"] if key is None else saved["state"].get(key)
            if source is None:
                raise ValueError(f"checkpoint has no optimizer state {key!r} for {layer}")
            destination[begin - first : end - first].copy_(
                source[begin - saved["offset"] : end - saved["offset"]]
            )
        if not local.is_contiguous():  # destination was a copy of a channels_last tensor
            local.copy_(destination.view(local.shape))


def _same_values(a: dict, b: dict) -> bool:
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
    optimizer: torch.optim.Optimizer, layout: ShardedLayout, payloads: Sequence[dict]
) -> None:
    """Load every rank's :func:`capture_layer_state` payload into this rank's ``layout``.

    The master weights are copied into the stepped tensors (parameters or fp32 partitions) and the
    optimizer state is replaced. Raises ``ValueError`` naming the layer when a piece is missing,
    the layers differ from the model's, or a partition's layers carry different step counters.
    """
    saved = _SavedLayers(payloads)
    names = layout.layer_names
    current = dict(zip(names, layout.layer_shapes, strict=True))
    for layer in sorted(current.keys() | saved.shapes.keys()):
        if layer not in saved.shapes:
            raise ValueError(f"checkpoint has no weights for parameter {layer}")
        if layer not in current:
            raise ValueError(f"checkpoint has parameter {layer}, which this model does not have")
        if current[layer] != saved.shapes[layer]:
            raise ValueError(
                f"parameter {layer} has shape {list(current[layer])} here but "
                f"{list(saved.shapes[layer])} in the checkpoint"
            )
    for tensor, entry in layout.items():
        for piece in entry.pieces:
            saved.copy_into(tensor, names[piece.layer], piece, None)
        layers = [names[k] for k in entry.layers]
        stepped = [layer for layer in layers if layer in saved.scalars]
        if not stepped:  # never stepped when the checkpoint was taken: nothing to restore
            optimizer.state.pop(tensor, None)
            continue
        if len(stepped) != len(layers):
            raise ValueError(
                f"{sorted(set(layers) - set(stepped))} have no optimizer state in the "
                f"checkpoint but share a partition with {stepped[0]}, which has"
            )
        scalars = saved.scalars[stepped[0]]
        for layer in stepped[1:]:
            if not _same_values(scalars, saved.scalars[layer]):
                raise ValueError(
                    f"{stepped[0]} and {layer} share one optimizer partition here but have "
                    "different per-tensor optimizer state (step counters) in the checkpoint"
                )
        keys = {key for layer in layers for run in saved.runs[layer] for key in run["state"]}
        state = {k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()}
        for key in sorted(keys):
            # Padding of a flat partition is never read by the layer-wise update: zeros are fine.
            state[key] = torch.zeros_like(tensor)
            for piece in entry.pieces:
                saved.copy_into(state[key], names[piece.layer], piece, key)
        optimizer.state[tensor] = state
