"""Checkpoint and resume: atomic directories, per-layer optimizer state, RNG states, resume policy.

* :mod:`.directory`: a checkpoint becomes visible only when every rank's files are durable;
  sizes and checksums of every file; keep-last-K; the newest complete checkpoint of a run.
* :mod:`.collectives`: the gather / broadcast / all-reduce saving and resuming use.
* :mod:`.geometry`: which rank file holds which elements of each layer.
* :mod:`.layer_state`: optimizer state and fp32 master weights per named layer, loadable at any
  world size and ZeRO stage.
* :mod:`.rng`: every global generator of a process, restored exactly or not at all.
* :mod:`.policy`: which checkpoint a run continues from and which config changes it may make.
* :mod:`.checkpointer`: what a training checkpoint holds, saved and restored for the trainer.
"""

from tvlars_scale.checkpoint.checkpointer import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointRestoreError,
)
from tvlars_scale.checkpoint.directory import (
    CHECKPOINTS_DIR,
    CheckpointInfo,
    complete_checkpoints,
    find_latest_complete,
    prune,
    remove_leftovers,
    save_checkpoint,
)
from tvlars_scale.checkpoint.policy import OPERATIONAL_KEYS, resolve_resume

__all__ = [
    "CHECKPOINTS_DIR",
    "OPERATIONAL_KEYS",
    "CheckpointCorruptError",
    "CheckpointInfo",
    "CheckpointRestoreError",
    "Checkpointer",
    "complete_checkpoints",
    "find_latest_complete",
    "prune",
    "remove_leftovers",
    "resolve_resume",
    "save_checkpoint",
]
