"""Throughput levers: ``model.channels_last`` and ``run.compile``, around Accelerate's ``prepare``.

**channels_last** (NHWC): a forward pre-hook makes every 4-D input channels_last (a no-op when the
augmentation already wrote it so), and under one process and DDP the weights of 4-D layers are
converted before ``prepare`` too (the optimizer keeps its parameters: ``Module.to`` swaps their data
in place). A convolution runs NHWC when its input or its weight is channels_last (cuDNN's and
oneDNN's rule), so under DeepSpeed ZeRO, which flattens the weights into contiguous buffers (its
broadcast at ``initialize`` refuses any other layout), and FSDP2, which refuses non-contiguous
parameters and all-gathers them contiguous, the weights stay NCHW and the input's layout alone
keeps the convolutions, and the activations after them, NHWC.

**compile**: ``nn.Module.compile`` compiles in place, so parameter and buffer names stay the eager
ones (no ``_orig_mod.``) in checkpoints, exports and the optimizer's layer names. By default the
whole model is one graph. Regional compilation (``run.compile_regional``) compiles each repeated
block instead (blocks of one class and shape share one graph): it is for models of many identical
blocks (transformers). A CNN's graph boundaries cost: inductor computes convolutions NHWC inside a
graph (always on the CPU) and hands back eager's layout at each boundary, so ResNet-50's regional
steps took 1.25-1.33x as long as whole-model ones on the CPU, for no shorter compile
(benchmarks/levers.py).
The order follows each backend's docs:

* one process and DDP: after ``prepare``, the unwrapped model (or its blocks) in place. Under DDP
  its forward then runs inside DDP's, so dynamo's DDPOptimizer still splits the graph at DDP's
  bucket boundaries (what PyTorch's "compile after wrapping" is for), while DDP's and Accelerate's
  own wrappers stay eager: compiling the wrapper instead counted 6 graph breaks at DDP's forward
  on the quick start, none of them in the model;
* FSDP2: the blocks (or the model) before ``fully_shard`` (torchtitan's and the FSDP2 docs' order);
* DeepSpeed: ``engine.compile()`` after ``deepspeed.initialize`` (DeepSpeed's documented API; it
  compiles the whole module, its ZeRO hooks decide the rest).

Graph breaks come from dynamo's counters (:func:`graph_breaks`), printed with the run's report.
"""

from __future__ import annotations

from collections import Counter

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

__all__ = [
    "compile_after_prepare",
    "compile_before_prepare",
    "compile_in_place",
    "graph_breaks",
    "repeated_blocks",
    "to_channels_last",
]


def to_channels_last(model: nn.Module, accelerator: Accelerator | None = None) -> nn.Module:
    """NHWC inputs and, where the backend keeps the parameters' layout (one process, DDP), NHWC
    weights (4-D parameters and buffers), in place; returns ``model``."""
    sharded = accelerator is not None and accelerator.distributed_type in (
        DistributedType.DEEPSPEED,
        DistributedType.FSDP,
    )
    if not sharded:
        model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(_inputs_to_channels_last)
    return model


def _inputs_to_channels_last(module: nn.Module, args: tuple) -> tuple:
    return tuple(
        arg.contiguous(memory_format=torch.channels_last)
        if isinstance(arg, torch.Tensor) and arg.ndim == 4
        else arg
        for arg in args
    )


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of ``nn.Sequential`` / ``nn.ModuleList`` containers whose class occurs at
    least twice and that have children of their own (a residual block, a transformer layer; not a
    lone convolution): what regional compilation compiles. Empty when the model has none."""
    containers = [m for m in model.modules() if isinstance(m, (nn.Sequential, nn.ModuleList))]
    candidates = [
        child
        for container in containers
        for child in container.children()
        if next(child.children(), None) is not None
    ]
    counts = Counter(type(child) for child in candidates)
    blocks = [child for child in candidates if counts[type(child)] >= 2]
    # A block inside another chosen block is compiled with it.
    inner = {id(m) for block in blocks for m in block.modules() if m is not block}
    return [block for block in blocks if id(block) not in inner]


def compile_in_place(model: nn.Module, mode: str = "default", regional: bool = False) -> None:
    """``nn.Module.compile`` on ``model``'s repeated blocks (``regional`` and it has some), else on
    the whole model; the names of parameters and buffers do not change."""
    blocks = repeated_blocks(model) if regional else []
    for module in blocks or [model]:
        module.compile(mode=mode)


def compile_before_prepare(
    model: nn.Module, accelerator: Accelerator, mode: str, regional: bool
) -> None:
    """FSDP2: compile before ``fully_shard`` wraps the blocks; other backends: nothing here."""
    if accelerator.distributed_type == DistributedType.FSDP:
        compile_in_place(model, mode, regional)


def compile_after_prepare(
    prepared: nn.Module, accelerator: Accelerator, mode: str, regional: bool
) -> None:
    """One process, DDP: compile the unwrapped model (or its blocks) in place; DeepSpeed: the
    engine's own ``compile``; FSDP2: done before ``prepare``."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return
    if kind == DistributedType.DEEPSPEED:
        prepared.compile(compile_kwargs={"mode": mode})
    else:
        compile_in_place(accelerator.unwrap_model(prepared), mode, regional)


def graph_breaks() -> dict[str, int]:
    """Graph breaks so far in this process by reason, most frequent first (dynamo's counters, keyed
    by each reason's first line: the rest is hints and debug context; empty without compile)."""
    from torch._dynamo.utils import counters

    reasons: Counter[str] = Counter()
    for reason, count in counters["graph_break"].items():
        reasons[reason.strip().split("\n", 1)[0]] += count
    return dict(reasons.most_common())
