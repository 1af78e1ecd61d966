"""Skip optimizer steps whose gradients hold NaN or Inf; stop after too many in a row.

Where the decision is taken depends on who steps the optimizer:

* one process / DDP, fp32 or bf16: the trainer checks the (already all-reduced, hence identical on
  every rank) gradients before ``optimizer.step()`` and does not call it;
* fp16 with Accelerate's ``GradScaler``: the scaler already skips non-finite steps (and lowers the
  loss scale, which needs it to see them), so its verdict is used;
* DeepSpeed: the engine steps inside the last micro-batch's backward, so the check must be its own.
  ZeRO-1/2 skip a step whose global gradient norm is NaN/Inf (fp32 and fp16 always; bf16 with
  ``bf16.check_grad_overflow``, the default) and ZeRO-3 always; ``engine.was_step_applied()`` then
  says what happened. :func:`check_deepspeed_skips_nonfinite` refuses a setup that would not skip.

A skipped step leaves parameters and optimizer state (step counters included) unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["NonFiniteError", "check_deepspeed_skips_nonfinite", "gradients_are_finite"]


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had non-finite gradients; the run stops."""


def gradients_are_finite(params: Iterable[torch.Tensor]) -> bool:
    """Whether every gradient of ``params`` is finite (parameters without a gradient are ignored).

    FSDP2's gradients are sharded DTensors: each rank checks its shards, and an all-reduce (MIN)
    over every dimension of their mesh makes all its ranks take the same decision."""
    grads = [p.grad for p in params if p.grad is not None]
    meshes = [g.device_mesh for g in grads if getattr(g, "placements", None) is not None]
    flags = [torch.isfinite(getattr(g, "_local_tensor", g)).all() for g in grads]
    finite = torch.stack(flags).all() if flags else torch.tensor(True)
    if meshes:
        import torch.distributed as dist

        verdict = finite.to(torch.int32)
        for dim in range(meshes[0].ndim):
            # collective: all_reduce(MIN) of one int per mesh dimension (FSDP2: 1, HSDP: 2).
            dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=meshes[0].get_group(dim))
        finite = verdict.bool()
    return bool(finite.item())  # host sync: one bool per optimizer step


def check_deepspeed_skips_nonfinite(engine) -> None:
    """Raise ``ValueError`` unless the DeepSpeed engine skips steps with non-finite gradients."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = engine.optimizer
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        return  # ZeRO-3 treats a NaN/Inf gradient norm as an overflow in every precision
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        # stage_1_and_2.step(): overflow = check_grad_overflow, or an invalid global norm when the
        # norm is computed and the dtype is not bf16.
        if optimizer.check_grad_overflow or (
            optimizer.compute_grad_norm and optimizer.dtype != torch.bfloat16
        ):
            return
        raise ValueError(
            "this DeepSpeed config would apply steps with NaN/Inf gradients: set "
            "bf16.check_grad_overflow (and zero_optimization.compute_grad_norm) to true"
        )
    raise ValueError(
        f"DeepSpeed without ZeRO ({type(optimizer).__name__}) does not skip steps with NaN/Inf "
        "gradients; use ZeRO stage 1, 2 or 3"
    )
