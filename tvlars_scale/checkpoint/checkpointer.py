"""What a training checkpoint holds, and putting it back: the trainer's side of checkpointing.

A checkpoint ``<run>/checkpoints/step-N/`` holds:

``model.pt`` (rank 0)
    the model's full ``state_dict`` (parameters and buffers: BatchNorm statistics), loadable by the
    model alone for evaluation or export; gathered first under ZeRO-3 and FSDP2 (every rank loads
    it back into its own shards).
``trainer.pt`` (rank 0)
    the trainer's own state: step and skipped-step counters, data position (epoch, micro-batches
    consumed and the global micro-batch size they were counted in), evaluation history. The LR
    schedule and TVLARS' phi_t are pure functions of the optimizer step, so the step counters (here
    and per layer in the optimizer state) are their whole state.
``config.yaml`` (rank 0)
    the resolved config, the reference for the resume policy (:mod:`.policy`).
``model_ema.pt`` (rank 0, with ``run.ema`` only)
    the moving average of the weights as a full ``state_dict`` (:mod:`tvlars_scale.training.ema`),
    for evaluation and export; the resume reads its per-layer runs instead (below).
``rank-<r>.pt`` (every rank)
    rank ``r``'s random states (Python, NumPy, torch CPU and CUDA, the task's augmentation
    generators), its model buffers, and the optimizer state and fp32 master weights it holds, per
    named layer (:mod:`.layer_state`), with the moving average's runs when there is one (and its
    averaged buffers, per rank like the buffers). The buffers are per rank because only DDP broadcasts rank 0's
    every forward: under DeepSpeed and FSDP2 each rank's BatchNorm statistics follow its own data,
    and a resume that gave every rank rank 0's would evaluate and train on differently.

Restoring on the same number of ranks continues bitwise. On another number of ranks, the model,
optimizer state and data position load exactly; a rank that existed before continues its own random
streams and buffers, a new rank keeps the fresh streams it was seeded with and the main process's
buffers (said once on the main process).

What a rank reads to resume (:mod:`.reading`): at the same world size and geometry its own rank
file; at another world size or under another engine ``ceil(old / new)`` rank files, each saved file
read by one rank and its pieces sent on in one all-to-all; then ``trainer.pt`` and ``model.pt``
(memory-mapped: an FSDP2 rank touches its own rows only). Every file it reads is checked against the
manifest's size and checksum before anything is loaded: a corrupt file is
:class:`CheckpointCorruptError`, one line naming the checkpoint and the file (``resume: auto`` then
takes the previous complete checkpoint, :meth:`~tvlars_scale.run_dir.RunDir.restore`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from tvlars_scale.checkpoint.collectives import Collectives, torch_collectives
from tvlars_scale.checkpoint.directory import (
    CheckpointInfo,
    load_bytes,
    load_file,
    rank_file,
    save_checkpoint,
)
from tvlars_scale.checkpoint.geometry import saved_geometry
from tvlars_scale.checkpoint.layer_state import (
    capture_layer_state,
    restore_layer_state,
    unsharded_layout,
)
from tvlars_scale.checkpoint.policy import CONFIG_FILE
from tvlars_scale.checkpoint.reading import (
    MODEL_FILE,
    TRAINER_FILE,
    CheckpointCorruptError,
    read_for_restore,
)
from tvlars_scale.checkpoint.rng import capture_rng_state, restore_rng_state
from tvlars_scale.config import ConfigError
from tvlars_scale.optim.sharding import ShardedLayout, local_tensor

__all__ = ["MODEL_EMA_FILE", "CheckpointCorruptError", "CheckpointRestoreError", "Checkpointer"]

MODEL_EMA_FILE = "model_ema.pt"


class CheckpointRestoreError(ConfigError):
    """A piece of a checkpoint could not be restored; the run must not continue as if it had.

    A bad ``checkpoint.resume`` target: the command line prints it as its one line and exits 2."""

    def __init__(self, checkpoint: Path, piece: str, problem: str):
        if len(problem) > 300:
            problem = problem[:297] + "..."
        super().__init__("checkpoint.resume", f"cannot restore {checkpoint}: {piece}: {problem}")


class TrainStateful(Protocol):
    """The training loop's own part of a checkpoint (counters, data position, history)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Checkpointer:
    """Saves and restores the model, optimizer, random states and the loop's state of one run, and
    owns the cadence: the loop reports finished steps (:meth:`should_save`, :meth:`save`), a
    position is saved once.

    Build it after ``accelerator.prepare`` and ``bind_zero``: it saves the optimizer state through
    the layout the optimizer is bound to (:attr:`layout`). ``train_state`` is the loop's part
    (``state_dict()["state"]`` is its position); ``config_yaml`` the resolved config saved with
    every checkpoint. :attr:`ema`, the run's moving average of the weights (built on
    :attr:`layout`; ``None``: none), is saved and restored with the optimizer state.
    """

    ema = None

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        task,
        run_dir: str | Path,
        *,
        keep_last: int,
        every_steps: int = 0,
        config_yaml: str = "",
        train_state: TrainStateful | None = None,
    ):
        self.accelerator, self.model, self.optimizer, self.task = (
            accelerator,
            model,
            optimizer,
            task,
        )
        self.run_dir, self.keep_last, self.every_steps = Path(run_dir), keep_last, every_steps
        self.config_yaml, self.train_state = config_yaml, train_state
        self._saved_position: dict | None = None  # the loop's position at the last save / restore
        self.module = accelerator.unwrap_model(model)
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.fsdp = accelerator.distributed_type == DistributedType.FSDP
        self.layout: ShardedLayout = self._state_layout()

    @functools.cached_property
    def collectives(self) -> Collectives:
        return torch_collectives(self.accelerator.device)

    @functools.cached_property
    def _geometry(self) -> dict | None:
        """Where each layer's runs are saved (:mod:`.geometry`): collectives on every rank, once,
        at the first save (the layout never changes)."""
        return saved_geometry(self.layout, owner=self._owner(), collectives=self.collectives)

    def _state_layout(self) -> ShardedLayout:
        """What the optimizer steps on this rank: under ZeRO the layout the layer-wise optimizer is
        bound to (built from the engine for an element-wise one), else its parameters as whole
        layers."""
        if self.deepspeed:
            from tvlars_scale.optim.zero_layout import find_zero_optimizer, zero_layout

            zero_optimizer = find_zero_optimizer(self.model)
            if zero_optimizer is not None:
                bound = getattr(zero_optimizer.optimizer, "layout", None)
                return bound if bound is not None else zero_layout(zero_optimizer)
        if self.fsdp:
            from tvlars_scale.optim.fsdp_layout import fsdp_layout

            bound = getattr(self.optimizer, "layout", None)
            return bound if bound is not None else fsdp_layout(self.optimizer, self.module)
        return unsharded_layout(self.module, self.optimizer)

    def _owner(self) -> bool:
        """Whether this rank writes its optimizer pieces: every rank holding a shard (HSDP: the
        first replica of it), or the main process when every rank holds everything."""
        if self.layout.sharded:
            return self.layout.replica_rank == 0
        return self.accelerator.is_main_process

    def _model_state(self) -> dict | None:
        """The model's full state dict on the main process (``None`` elsewhere)."""
        state = self.module.state_dict()
        if self.fsdp:
            # collective: one all-gather per sharded tensor, on every rank, in the same order.
            state = {k: v.full_tensor() if _is_dtensor(v) else v for k, v in state.items()}
        if not self.accelerator.is_main_process:
            return None
        return {k: v.detach().clone() for k, v in state.items()}

    @torch.no_grad()
    def _load_model_state(self, saved: dict) -> None:
        """Every rank copies its own rows of each FSDP2-sharded tensor from the full state dict
        (no collective); anything else loads as usual."""
        if not self.fsdp:
            self.module.load_state_dict(saved)
            return
        current = self.module.state_dict()
        if current.keys() != saved.keys():
            missing, unexpected = current.keys() - saved.keys(), saved.keys() - current.keys()
            raise ValueError(
                f"model state: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        from tvlars_scale.optim.fsdp_layout import shard_rows

        for key, tensor in current.items():
            value = saved[key]
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{key} has shape {list(tensor.shape)} here but {list(value.shape)} saved"
                )
            if _is_dtensor(tensor):
                _, first, count = shard_rows(tensor)
                local_tensor(tensor).copy_(value.narrow(0, first, count))
            else:
                tensor.copy_(value)

    @torch.no_grad()
    def _load_buffers(self, saved: dict) -> None:
        """This rank's own buffers (BatchNorm statistics), over the main process's in ``model.pt``."""
        current = dict(self.module.named_buffers())
        if current.keys() != saved.keys():
            missing, unexpected = current.keys() - saved.keys(), saved.keys() - current.keys()
            raise ValueError(f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        for name, buffer in current.items():
            buffer.copy_(saved[name])

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
    def should_save(self, step: int) -> bool:
        """Whether optimizer step ``step``, just applied, is due for a checkpoint."""
        return bool(self.every_steps) and step % self.every_steps == 0

    def save(self, step: int) -> Path | None:
        """Checkpoint the loop's current position as ``step`` (call on every rank at the same
        optimizer step); a position already saved or just restored is not written again."""
        trainer_state = self.train_state.state_dict()
        position = trainer_state["state"]
        if position == self._saved_position:
            return None
        metadata = {"epoch": position["epoch"], "num_samples": position["num_samples"]}
        path = self._write(step, trainer_state, metadata)
        self._saved_position = position
        return path

    def _write(self, step: int, trainer_state: dict, metadata: dict) -> Path:
        accelerator = self.accelerator
        with self._full_parameters(modifier_rank=None):
            model_state = self._model_state()
        rank_payload = {
            "rng": capture_rng_state(),
            "task": self.task.state_dict(),
            "buffers": {k: v.detach().clone() for k, v in self.module.named_buffers()},
            "layers": capture_layer_state(
                self.optimizer,
                self.layout,
                owner=self._owner(),
                ema=self.ema.shadows if self.ema is not None else None,
            ),
        }
        shared = {
            MODEL_FILE: model_state,
            TRAINER_FILE: trainer_state,
            CONFIG_FILE: self.config_yaml,
        }
        if self.ema is not None:
            rank_payload["ema_buffers"] = {k: v.clone() for k, v in self.ema.buffers.items()}
            # collective: the average's layers made whole (one all-reduce when sharded).
            shared[MODEL_EMA_FILE] = self.ema.state_dict()
        return save_checkpoint(
            self.run_dir,
            step,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            rank_payload=rank_payload,
            shared_payloads=shared if accelerator.is_main_process else {},
            metadata=metadata,
            keep_last=self.keep_last,
            collectives=self.collectives,
            geometry=self._geometry,
        )

    # --- restoring ---------------------------------------------------------------------------------
    def restore(self, info: CheckpointInfo, print_fn: Callable[[str], None]) -> dict:
        """Load ``info`` into the model, optimizer, task, global RNGs and the loop's state; return
        the loop's saved state. Call on every rank with the same ``info`` (rank 0's).

        Raises :class:`CheckpointCorruptError` when a file differs from the manifest (nothing is
        loaded then), :class:`CheckpointRestoreError` naming the piece that cannot be restored.
        """
        rank, world_size = self.accelerator.process_index, self.accelerator.num_processes
        own = rank if rank < info.world_size else None
        piece = "the optimizer state (per layer)"  # what is being restored, for the error
        try:
            inputs = read_for_restore(info, self.layout, self.collectives)
            own_payload = inputs.own
            piece = MODEL_FILE
            model_state = load_file(info.path, MODEL_FILE, mmap=True)
            with self._full_parameters(modifier_rank=0):
                self._load_model_state(model_state)
            del model_state

            def layer_payloads():
                nonlocal piece
                for source, payload in inputs.layers:
                    piece = f"the optimizer state (per layer) in {source}"
                    yield payload  # released once merged

            ema = self.ema.shadows if self.ema is not None else None
            ema_restored = restore_layer_state(
                self.optimizer, self.layout, layer_payloads(), ema=ema
            )
            piece = "the optimizer state (per layer)"
            if own is not None:
                piece = f"the random states in {rank_file(own)}"
                restore_rng_state(own_payload["rng"])
                piece = f"the task state in {rank_file(own)}"
                self.task.load_state_dict(own_payload["task"])
                if "buffers" in own_payload:  # checkpoints written before 2026-12 lack them
                    piece = f"the model buffers in {rank_file(own)}"
                    self._load_buffers(own_payload["buffers"])
            if self.ema is not None:
                piece = f"the moving average's buffers in {rank_file(own or 0)}"
                self._restore_ema(ema_restored, own_payload, print_fn)
            piece = TRAINER_FILE
            trainer_state = load_bytes(inputs.trainer)
        except (OSError, RuntimeError, ValueError, KeyError, EOFError) as error:
            problem = " ".join(str(error).split()) or type(error).__name__
            raise CheckpointRestoreError(info.path, piece, problem) from error
        if world_size != info.world_size:
            low, high = sorted((world_size, info.world_size))
            ranks = f"rank {low}" if high - low == 1 else f"ranks {low}..{high - 1}"
            fate = "start fresh" if world_size > info.world_size else "end here"
            print_fn(
                f"resuming a {info.world_size}-rank checkpoint on {world_size} "
                f"rank{'s' if world_size > 1 else ''}: model, optimizer state and data position "
                f"are exact; the random streams of {ranks} {fate}"
            )
        if self.train_state is not None:
            self.train_state.load_state_dict(trainer_state)
            self._saved_position = self.train_state.state_dict()["state"]
        return trainer_state

    def _restore_ema(self, restored: bool, own_payload: dict | None, print_fn) -> None:
        """The average's buffers from this rank's own file; a checkpoint without an average
        starts it from the restored weights."""
        saved_buffers = (own_payload or {}).get("ema_buffers")
        if not restored:
            print_fn("the checkpoint has no moving average: run.ema starts from its weights")
            self.ema.reset()
        elif saved_buffers is None:
            self.ema.reset(buffers_only=True)
        else:
            for name, average in self.ema.buffers.items():
                average.copy_(saved_buffers[name])


def _is_dtensor(tensor) -> bool:
    return getattr(tensor, "placements", None) is not None
