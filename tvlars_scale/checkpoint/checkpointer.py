"""What a training checkpoint holds, and putting it back: the trainer's side of checkpointing.

A checkpoint ``<run>/checkpoints/step-N/`` holds:

``model.pt`` (rank 0)
    the model's full ``state_dict`` (parameters and buffers: BatchNorm statistics), loadable by the
    model alone for evaluation or export; gathered first under ZeRO-3.
``trainer.pt`` (rank 0)
    the trainer's own state: step and skipped-step counters, data position (epoch, micro-batches
    consumed and the global micro-batch size they were counted in), evaluation history. The LR
    schedule and TVLARS' phi_t are pure functions of the optimizer step, so the step counters (here
    and per layer in the optimizer state) are their whole state.
``config.yaml`` (rank 0)
    the resolved config, the reference for the resume policy (:mod:`.policy`).
``rank-<r>.pt`` (every rank)
    rank ``r``'s random states (Python, NumPy, torch CPU and CUDA, the task's augmentation
    generators) and the optimizer state and fp32 master weights it holds, per named layer
    (:mod:`.layer_state`).

Restoring on the same number of ranks continues bitwise. On another number of ranks, the model,
optimizer state and data position load exactly; a rank that existed before continues its own random
streams, a new rank keeps the fresh streams it was seeded with (said once on the main process).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from tvlars_scale.checkpoint.directory import (
    CheckpointInfo,
    load_file,
    rank_file,
    save_checkpoint,
)
from tvlars_scale.checkpoint.layer_state import (
    StateLayout,
    capture_layer_state,
    restore_layer_state,
    unsharded_state_layout,
    zero_state_layout,
)
from tvlars_scale.checkpoint.rng import capture_rng_state, restore_rng_state

__all__ = ["CheckpointRestoreError", "Checkpointer"]

MODEL_FILE = "model.pt"
TRAINER_FILE = "trainer.pt"
CONFIG_FILE = "config.yaml"


class CheckpointRestoreError(RuntimeError):
    """A piece of a checkpoint could not be restored; the run must not continue as if it had."""


class Checkpointer:
    """Saves and restores the model, optimizer, random states and trainer state of one run.

    Build it on every rank after ``accelerator.prepare`` (and ``bind_zero``), at the same point:
    under ZeRO it learns which layer runs each rank holds with one collective.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        task,
        run_dir: str | Path,
        keep_last: int,
    ):
        self.accelerator, self.model, self.optimizer, self.task = (
            accelerator,
            model,
            optimizer,
            task,
        )
        self.run_dir, self.keep_last = Path(run_dir), keep_last
        self.module = accelerator.unwrap_model(model)
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.layout: StateLayout = self._state_layout()

    def _state_layout(self) -> StateLayout:
        if self.deepspeed:
            from tvlars_scale.optim.zero_layout import find_zero_optimizer

            if find_zero_optimizer(self.model) is not None:
                return zero_state_layout(self.model)
        return unsharded_state_layout(self.module, self.optimizer, self.accelerator.process_index)

    @contextlib.contextmanager
    def _full_parameters(self, modifier_rank: int | None):
        """Whole parameters inside the block: ZeRO-3 gathers them (a no-op for other settings)."""
        if not self.deepspeed:
            yield
            return
        import deepspeed

        # collective: ZeRO-3 all-gathers every parameter (and re-partitions from modifier_rank on exit).
        with deepspeed.zero.GatheredParameters(
            list(self.module.parameters()), modifier_rank=modifier_rank
        ):
            yield

    # --- saving ------------------------------------------------------------------------------------
    def save(self, step: int, trainer_state: dict, config_yaml: str, metadata: dict) -> Path:
        """Write checkpoint ``step`` (call on every rank at the same optimizer step)."""
        accelerator = self.accelerator
        with self._full_parameters(modifier_rank=None):
            model_state = (
                {k: v.detach().clone() for k, v in self.module.state_dict().items()}
                if accelerator.is_main_process
                else None
            )
        rank_payload = {
            "rng": capture_rng_state(),
            "task": self.task.state_dict(),
            "layers": capture_layer_state(self.optimizer, self.layout),
        }
        shared = {MODEL_FILE: model_state, TRAINER_FILE: trainer_state, CONFIG_FILE: config_yaml}
        return save_checkpoint(
            self.run_dir,
            step,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            rank_payload=rank_payload,
            shared_payloads=shared if accelerator.is_main_process else {},
            metadata=metadata,
            keep_last=self.keep_last,
            # collective: barrier over every rank.
            barrier=accelerator.wait_for_everyone,
        )

    # --- restoring ---------------------------------------------------------------------------------
    def restore(self, info: CheckpointInfo, print_fn: Callable[[str], None]) -> dict:
        """Load ``info`` into the model, optimizer, task and global RNGs; return the trainer state.

        Raises :class:`CheckpointRestoreError` naming the piece that cannot be restored.
        """
        rank, world_size = self.accelerator.process_index, self.accelerator.num_processes
        try:
            model_state = load_file(info.path, MODEL_FILE)
            with self._full_parameters(modifier_rank=0):
                self.module.load_state_dict(model_state)
            payloads = [
                load_file(info.path, rank_file(r), mmap=True) for r in range(info.world_size)
            ]
            restore_layer_state(self.optimizer, self.layout, [p["layers"] for p in payloads])
            if rank < info.world_size:
                restore_rng_state(payloads[rank]["rng"])
                self.task.load_state_dict(payloads[rank]["task"])
            trainer_state = load_file(info.path, TRAINER_FILE)
        except (OSError, RuntimeError, ValueError, KeyError) as error:
            raise CheckpointRestoreError(f"cannot restore {info.path}: {error}") from error
        if world_size != info.world_size:
            low, high = sorted((world_size, info.world_size))
            ranks = f"rank {low}" if high - low == 1 else f"ranks {low}..{high - 1}"
            fate = "start fresh" if world_size > info.world_size else "end here"
            print_fn(
                f"resuming a {info.world_size}-rank checkpoint on {world_size} "
                f"rank{'s' if world_size > 1 else ''}: model, optimizer state and data position "
                f"are exact; the random streams of {ranks} {fate}"
            )
        return trainer_state
