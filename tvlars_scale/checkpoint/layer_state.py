"""Optimizer state and fp32 master weights saved per named layer, so they load at any world size.

What an optimizer steps depends on the parallel setting: the model's own parameters (one process,
DDP), or DeepSpeed ZeRO's flat fp32 partitions, in which a layer may be cut between two ranks.
A :class:`StateLayout` describes what this rank steps as *runs* of whole named layers: the tensor,
the element range inside it, and the element range of the layer it holds. Saving writes every run
this rank owns, with the layer offset; loading, under any other layout, copies each run it needs
from the overlapping saved runs. The saved form depends on the layers alone, never on the world size
or the ZeRO stage, so a checkpoint of 2 ZeRO-2 ranks loads on 1 process without DeepSpeed, or on 3.

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
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "LayerRun",
    "StateLayout",
    "capture_layer_state",
    "restore_layer_state",
    "unsharded_state_layout",
    "zero_state_layout",
]


@dataclass(frozen=True)
class LayerRun:
    """``numel`` elements of layer ``layer`` from ``layer_offset`` on, at ``start`` in the tensor."""

    layer: str
    layer_offset: int
    start: int
    numel: int


@dataclass(frozen=True)
class Holding:
    """One tensor the optimizer steps on this rank."""

    tensor: torch.Tensor
    layers: tuple[str, ...]
    """Every layer whose elements this tensor's optimizer state covers, held here or on another
    rank: they share the tensor's per-tensor state (step counter)."""
    runs: tuple[LayerRun, ...]
    """The runs held here; padding is not covered."""


@dataclass(frozen=True)
class StateLayout:
    layer_shapes: dict[str, tuple[int, ...]]
    holdings: tuple[Holding, ...]
    owner: bool
    """Whether this rank writes its runs (unsharded: rank 0 only, the others hold copies)."""


def unsharded_state_layout(
    model: nn.Module, optimizer: torch.optim.Optimizer, rank: int
) -> StateLayout:
    """The optimizer steps the model's own parameters; every rank holds all of them."""
    names = {id(p): name for name, p in model.named_parameters()}
    shapes, holdings = {}, []
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:
                raise ValueError(
                    f"the optimizer steps a tensor of shape {tuple(p.shape)} that is not a parameter "
                    "of the model"
                )
            shapes[name] = tuple(p.shape)
            holdings.append(Holding(p, (name,), (LayerRun(name, 0, 0, p.numel()),)))
    return StateLayout(shapes, tuple(holdings), owner=rank == 0)


def zero_state_layout(engine) -> StateLayout:
    """What this rank's DeepSpeed ZeRO-1/2/3 optimizer steps: flat fp32 partitions of named layers.

    collective: one ``all_gather_object`` of this rank's run lengths, which fixes every run's offset
    inside its layer (a layer's runs follow each other in rank order).
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    from tvlars_scale.optim.zero_layout import find_zero_optimizer, zero_layout

    zero_optimizer = find_zero_optimizer(engine)
    if zero_optimizer is None:
        raise ValueError(
            "zero_state_layout: the engine does not shard the optimizer (ZeRO stage 0)"
        )
    layout = zero_layout(zero_optimizer)
    if isinstance(zero_optimizer, DeepSpeedZeroOptimizer_Stage3):
        partitions = zero_optimizer.fp32_partitioned_groups_flat
    else:
        partitions = zero_optimizer.single_partition_of_fp32_groups
    names = layout.layer_names
    local = []  # (partition index, layer name, start in partition, numel)
    for index, partition in enumerate(partitions):
        entry = layout.of(partition)
        local += [(index, names[p.layer], p.start, p.numel) for p in entry.pieces]
    held = [layer for _, layer, _, _ in local]
    if len(held) != len(set(held)):
        raise RuntimeError("zero_state_layout: a layer appears twice in one rank's partitions")

    group = layout.process_group
    gathered: list = [None] * dist.get_world_size(group)
    # collective: all_gather_object of (layer, numel) pairs, a few bytes per layer.
    dist.all_gather_object(gathered, [(layer, numel) for _, layer, _, numel in local], group=group)
    rank = dist.get_rank(group)
    offsets: dict[str, int] = defaultdict(int)
    mine: dict[str, int] = {}
    for other_rank, runs in enumerate(gathered):
        for layer, numel in runs:
            if other_rank == rank:
                mine[layer] = offsets[layer]
            offsets[layer] += numel
    shapes = dict(zip(names, layout.layer_shapes, strict=True))
    for layer, shape in shapes.items():
        if offsets[layer] != math.prod(shape):
            raise RuntimeError(
                f"zero_state_layout: the ranks hold {offsets[layer]} elements of {layer}, "
                f"which has {math.prod(shape)}"
            )

    holdings = []
    for index, partition in enumerate(partitions):
        entry = layout.of(partition)
        runs = tuple(
            LayerRun(layer, mine[layer], start, numel)
            for i, layer, start, numel in local
            if i == index
        )
        holdings.append(Holding(partition, tuple(names[k] for k in entry.layers), runs))
    return StateLayout(shapes, tuple(holdings), owner=True)


def _is_elementwise(value, tensor: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape == tensor.shape


def _run_of(tensor: torch.Tensor, run: LayerRun) -> torch.Tensor:
    return tensor.view(-1).narrow(0, run.start, run.numel)


def capture_layer_state(optimizer: torch.optim.Optimizer, layout: StateLayout) -> dict:
    """This rank's part of the optimizer state and master weights, by layer (see module docstring).

    Every run is cloned: saving a view would write the whole flat partition behind it.
    """
    payload: dict = {"shapes": {}, "scalars": {}, "runs": []}
    if not layout.owner:
        return payload
    payload["shapes"] = {name: list(shape) for name, shape in layout.layer_shapes.items()}
    for holding in layout.holdings:
        state = optimizer.state.get(holding.tensor, {})
        scalars = {k: v for k, v in state.items() if not _is_elementwise(v, holding.tensor)}
        elementwise = {k: v for k, v in state.items() if _is_elementwise(v, holding.tensor)}
        if state:
            for layer in holding.layers:
                payload["scalars"][layer] = {
                    k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()
                }
        for run in holding.runs:
            payload["runs"].append(
                {
                    "layer": run.layer,
                    "offset": run.layer_offset,
                    "numel": run.numel,
                    "weights": _run_of(holding.tensor.detach(), run).float().clone(),
                    "state": {k: _run_of(v, run).clone() for k, v in elementwise.items()},
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

    def copy_into(self, target: torch.Tensor, run: LayerRun, key: str | None) -> None:
        """Fill ``run`` of ``target`` from the saved runs (``key`` None: the weights)."""
        first, last = run.layer_offset, run.layer_offset + run.numel
        destination = _run_of(target, run)
        for saved in self.runs[run.layer]:
            begin, end = max(first, saved["offset"]), min(last, saved["offset"] + saved["numel"])
            if begin >= end:
                continue
            source = saved["weights"] if key is None else saved["state"].get(key)
            if source is None:
                raise ValueError(f"checkpoint has no optimizer state {key!r} for {run.layer}")
            destination[begin - first : end - first].copy_(
                source[begin - saved["offset"] : end - saved["offset"]]
            )


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
    optimizer: torch.optim.Optimizer, layout: StateLayout, payloads: Sequence[dict]
) -> None:
    """Load every rank's :func:`capture_layer_state` payload into this rank's ``layout``.

    The master weights are copied into the stepped tensors (parameters or fp32 partitions) and the
    optimizer state is replaced. Raises ``ValueError`` naming the layer when a piece is missing,
    the layers differ from the model's, or a partition's layers carry different step counters.
    """
    saved = _SavedLayers(payloads)
    current = layout.layer_shapes
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
    for holding in layout.holdings:
        tensor = holding.tensor
        for run in holding.runs:
            saved.copy_into(tensor, run, None)
        stepped = [layer for layer in holding.layers if layer in saved.scalars]
        if not stepped:  # never stepped when the checkpoint was taken: nothing to restore
            optimizer.state.pop(tensor, None)
            continue
        if len(stepped) != len(holding.layers):
            raise ValueError(
                f"{sorted(set(holding.layers) - set(stepped))} have no optimizer state in the "
                f"checkpoint but share a partition with {stepped[0]}, which has"
            )
        scalars = saved.scalars[stepped[0]]
        for layer in stepped[1:]:
            if not _same_values(scalars, saved.scalars[layer]):
                raise ValueError(
                    f"{stepped[0]} and {layer} share one optimizer partition here but have "
                    "different per-tensor optimizer state (step counters) in the checkpoint"
                )
        keys = {
            key for layer in holding.layers for run in saved.runs[layer] for key in run["state"]
        }
        state = {k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()}
        for key in sorted(keys):
            # Padding of a flat partition is never read by the layer-wise update: zeros are fine.
            state[key] = torch.zeros_like(tensor)
            for run in holding.runs:
                saved.copy_into(state[key], run, key)
        optimizer.state[tensor] = state
