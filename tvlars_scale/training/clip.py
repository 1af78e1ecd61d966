"""Gradient clipping by the global L2 norm of the whole model, though ranks may hold shards of it.

torch's ``clip_grad_norm_`` semantics: ``total_norm = ||(g_1, ..., g_n)||_2`` over every stepped
tensor, then every gradient is multiplied by ``min(1, max_norm / (total_norm + 1e-6))``. The factor
is computed on the device and applied unconditionally (``clamp``, no ``if``), so the step holds no
host sync; a NaN/Inf norm makes every gradient NaN, which the non-finite check then skips.

What a rank holds is the :class:`~tvlars_scale.optim.sharding.ShardedLayout` the optimizer steps:
whole parameters (one process, DDP: gradients already all-reduced, no collective) or FSDP2's DTensor
shards (each rank sums the squares of its own rows, and ONE ``all_reduce(SUM)`` of that scalar over
the shard group makes the whole model's; HSDP replicas hold the same rows and are not in that
group). DeepSpeed ZeRO clips its own flat partitions (``gradient_clipping``, set from the same key:
:mod:`tvlars_scale.accelerate_setup`); the loop then reads the engine's norm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tvlars_scale.optim.sharding import ShardedLayout, local_tensor

__all__ = ["clip_grad_norm"]


@torch.no_grad()
def clip_grad_norm(layout: ShardedLayout, max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``layout``'s tensors in place to global norm ``max_norm``; return the
    norm before clipping (a 0-dim float32 tensor on the gradients' device, the same on every rank).
    """
    grads = [local_tensor(t.grad) for t, _ in layout.items() if t.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float32, device=device)
    if grads:
        norms = torch._foreach_norm(grads, 2.0)
        squares = torch.stack([n.float() for n in norms]).square().sum()
    if layout.sharded:
        # collective: the only one -- all_reduce(SUM) of one float32 over the shard group.
        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=layout.process_group)
    total_norm = squares.sqrt()
    clip_coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    if grads:
        torch._foreach_mul_(grads, clip_coef.to(grads[0].dtype))
    return total_norm
