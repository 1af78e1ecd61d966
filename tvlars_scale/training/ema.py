"""An exponential moving average of the weights, sharded like the fp32 master weights it averages.

``ema = decay_t * ema + (1 - decay_t) * w`` every ``every_steps`` optimizer steps (timm's
``ModelEmaV3`` update, ``torch._foreach_lerp_``), starting from the initial weights. With
``warmup_steps = W > 0`` the decay of the ``t``-th update (``t = 0, 1, ...``) is ModelEmaV3's warm-up
``1 - (1 + t / gamma) ** -(2/3)`` capped at ``decay`` (timm/utils/model_ema.py, ``get_decay``), with
``gamma = W / ((1 - decay) ** -1.5 - 1)`` so that the ramp reaches ``decay`` at update ``W``; the
first update (``t = 0``) then copies the weights. ``t`` is derived from the optimizer step, so the
average's whole state is its buffers.

What is averaged is what the optimizer steps: one fp32 buffer per tensor of the
:class:`~tvlars_scale.optim.sharding.ShardedLayout` (the model's parameters; DeepSpeed ZeRO's flat
fp32 partitions; FSDP2's local DTensor shards), so no rank holds a full copy under ZeRO / FSDP2; the
checkpoint saves it per named layer beside the master weights
(:mod:`tvlars_scale.checkpoint.layer_state`). Like ModelEmaV3, the model's floating-point buffers
(BatchNorm statistics) are averaged too; they are per rank, as in the checkpoint.

Evaluating it (:meth:`WeightEMA.swapped_in`) puts the average into the model's parameters for the
block and the raw weights back after it, bit for bit: a local copy where the layout's tensors are the
model's own parameters or shards (one process, DDP, FSDP2); under ZeRO-1/2, whose ranks each run the
full parameters, the layers are made whole by one all-reduce (:meth:`WeightEMA.full_layers`); under
ZeRO-3 each parameter's partition (and the whole tensor of the small ones it keeps gathered) is
filled from them.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from tvlars_scale.optim.sharding import ShardedLayout, local_tensor

__all__ = ["WeightEMA", "ema_decay"]

_WARMUP_POWER = 2.0 / 3.0  # timm ModelEmaV3's default warmup_power


def ema_decay(update: int, decay: float, warmup_steps: int) -> float:
    """The decay of update number ``update`` (0-based): see the module docstring."""
    if warmup_steps == 0:
        return decay
    gamma = warmup_steps / ((1.0 - decay) ** (-1.0 / _WARMUP_POWER) - 1.0)
    return min(decay, 1.0 - (1.0 + update / gamma) ** -_WARMUP_POWER)


class WeightEMA:
    """fp32 moving averages of ``layout``'s tensors and of ``module``'s floating-point buffers."""

    def __init__(
        self,
        layout: ShardedLayout,
        module: nn.Module,
        *,
        decay: float,
        warmup_steps: int = 0,
        every_steps: int = 1,
    ):
        self.layout, self.module = layout, module
        self.decay, self.warmup_steps, self.every_steps = decay, warmup_steps, every_steps
        self.shadows = {id(t): local_tensor(t).detach().float().clone() for t, _ in layout.items()}
        self.buffers = {
            name: b.detach().float().clone()
            for name, b in module.named_buffers()
            if b.is_floating_point()
        }

    @torch.no_grad()
    def reset(self, *, buffers_only: bool = False) -> None:
        """Start the average again from the current weights (a checkpoint without one) or only
        from the current buffers (a rank whose own checkpoint file is absent or older)."""
        if not buffers_only:
            for tensor, _ in self.layout.items():
                self.shadows[id(tensor)].copy_(local_tensor(tensor).detach())
        named = dict(self.module.named_buffers())
        for name, average in self.buffers.items():
            average.copy_(named[name])

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step`` (counted from 1) was applied: update when it is due."""
        if step % self.every_steps:
            return
        weight = 1.0 - ema_decay(step // self.every_steps - 1, self.decay, self.warmup_steps)
        # The master weights are fp32 (ZeRO's partitions, FSDP2's shards, the model's own weights).
        sources = [local_tensor(t).detach().float() for t, _ in self.layout.items()]
        torch._foreach_lerp_(list(self.shadows.values()), sources, weight)
        named = dict(self.module.named_buffers())
        averaged = [named[name] for name in self.buffers]
        if averaged:
            torch._foreach_lerp_(list(self.buffers.values()), [b.float() for b in averaged], weight)

    @torch.no_grad()
    def full_layers(self) -> dict[str, torch.Tensor]:
        """Every layer's whole average (fp32, original shape) on every rank. Sharded: each rank
        writes the pieces it holds into one flat vector of all layers and ONE all-reduce (SUM) over
        the world sums them (HSDP: replica 0 alone contributes, the pieces tile each layer once)."""
        layout = self.layout
        numels = [int(torch.Size(shape).numel()) for shape in layout.layer_shapes]
        starts = [0, *itertools.accumulate(numels)][:-1]
        device = next(iter(self.shadows.values())).device if self.shadows else "cpu"
        flat = torch.zeros(sum(numels), dtype=torch.float32, device=device)
        if not layout.sharded or layout.replica_rank == 0:
            for tensor, entry in layout.items():
                shadow = self.shadows[id(tensor)].reshape(-1)
                for piece in entry.pieces:
                    begin = starts[piece.layer] + piece.layer_offset
                    flat[begin : begin + piece.numel] = shadow[
                        piece.start : piece.start + piece.numel
                    ]
        if layout.sharded:
            # collective: all_reduce(SUM) of every layer's elements (fp32) over the whole world.
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return {
            name: flat[start : start + n].view(shape)
            for name, start, n, shape in zip(
                layout.layer_names, starts, numels, layout.layer_shapes, strict=True
            )
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average as the module's full ``state_dict`` (parameters and buffers; the integer
        buffers as they are): what ``model_ema.pt`` and the export hold. Collective when sharded."""
        layers = self.full_layers()
        state = {}
        for name, value in self.module.state_dict().items():
            if name in layers:
                state[name] = layers[name].clone()
            elif name in self.buffers:
                state[name] = self.buffers[name].clone()
            else:
                state[name] = local_tensor(value).detach().clone()
        return state

    def evaluated(self, evaluate: Callable[[], dict]) -> dict:
        """``evaluate()``'s metrics for the average (keys prefixed ``ema_``), the raw weights back
        after. Collective under ZeRO / FSDP2 (:meth:`swapped_in`): call on every rank."""
        with self.swapped_in():
            return {f"ema_{key}": value for key, value in evaluate().items()}

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The average in the model's parameters and buffers inside the block; the raw ones after."""
        restore = self._swap_parameters()
        named = dict(self.module.named_buffers())
        raw_buffers = {name: named[name].detach().clone() for name in self.buffers}
        with torch.no_grad():
            for name, average in self.buffers.items():
                named[name].copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, raw in raw_buffers.items():
                    named[name].copy_(raw)
                restore()

    @torch.no_grad()
    def _swap_parameters(self):
        """Copy the average into what the forward reads; return the function that copies back."""
        module_params = {id(p) for p in self.module.parameters()}
        own = [t for t, _ in self.layout.items()]
        if all(id(t) in module_params for t in own):
            # The layout's tensors are the parameters (or their FSDP2 shards): local, no collective.
            targets = [local_tensor(t.detach()) for t in own]
            sources = [self.shadows[id(t)] for t in own]
        else:
            targets, sources = self._zero_targets()
        raw = [t.clone() for t in targets]
        _reshard(self.module)
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source.view_as(target))

        gathered = {id(p) for p in _zero3_gathered(self.module)}

        def restore() -> None:
            _reshard(self.module)
            with torch.no_grad():
                for target, saved in zip(targets, raw, strict=True):
                    target.copy_(saved)
                # ZeRO-3 keeps the small parameters the block's forward gathered: whole again from
                # their restored partitions.
                _zero3_regather([p for p in _zero3_gathered(self.module) if id(p) not in gathered])

        return restore

    def _zero_targets(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """DeepSpeed ZeRO: the averaged layers made whole (one all-reduce), paired with what each
        parameter's forward reads -- the parameter itself (ZeRO-1/2), or under ZeRO-3 its partition
        ``ds_tensor`` and, for the small parameters ZeRO-3 keeps gathered, the whole tensor too."""
        layers = self.full_layers()
        targets, sources = [], []
        for name, p in self.module.named_parameters():
            average = layers[name].reshape(-1)
            partition = getattr(p, "ds_tensor", None)
            if partition is None:
                targets.append(p.data)
                sources.append(average.to(p.dtype))
                continue
            size = partition.numel()
            rank = dist.get_rank(group=p.ds_process_group)
            part = torch.zeros(size, dtype=partition.dtype, device=partition.device)
            mine = average[rank * size : (rank + 1) * size]
            part[: mine.numel()] = mine
            targets.append(partition.data)
            sources.append(part)
            if p.data.numel() == p.ds_numel:  # gathered and kept (ZeRO-3 persistent parameter)
                targets.append(p.data)
                sources.append(average.to(p.dtype))
        return targets, sources


def _reshard(module: nn.Module) -> None:
    """FSDP2 keeps the root module's parameters gathered after a forward (for the backward that
    usually follows): drop them, so the next forward gathers what the shards hold now. No
    collective; nothing to do for other engines."""
    from torch.distributed.fsdp import FSDPModule

    for submodule in module.modules():
        if isinstance(submodule, FSDPModule):
            submodule.reshard()


def _zero3_gathered(module: nn.Module) -> list[nn.Parameter]:
    """ZeRO-3 parameters whose whole tensor is held (its persistent ones, once gathered)."""
    return [
        p for p in module.parameters() if hasattr(p, "ds_tensor") and p.data.numel() == p.ds_numel
    ]


def _zero3_regather(params: list[nn.Parameter]) -> None:
    """Each parameter's whole tensor from its ranks' partitions (``ds_tensor``); the same list on
    every rank (ZeRO-3's state is symmetric)."""
    if not params:
        return
    world = dist.get_world_size(group=params[0].ds_process_group)
    rank = dist.get_rank(group=params[0].ds_process_group)
    sizes = [p.ds_tensor.numel() for p in params]
    flat = torch.zeros(sum(sizes) * world, dtype=torch.float32, device=params[0].ds_tensor.device)
    offset = 0
    for p, size in zip(params, sizes, strict=True):
        flat[offset + rank * size : offset + (rank + 1) * size] = p.ds_tensor.float()
        offset += size * world
    # collective: all_reduce(SUM) of the listed parameters' partitions (fp32), at most once per
    # evaluation with the average.
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=params[0].ds_process_group)
    offset = 0
    for p, size in zip(params, sizes, strict=True):
        p.data.copy_(flat[offset : offset + p.ds_numel].view_as(p.data))
        offset += size * world
