"""A run directory: which files a run owns, starting / refusing / overwriting / resuming in it,
and the files the loop writes there.

``<run.output_dir>/`` holds::

    config.yaml          the resolved config (written at start)
    metrics.json         final and per-evaluation metrics (written at the end)
    layer_stats.jsonl    per-layer weight / update norms and trust ratios per log step
    tensorboard/         TensorBoard events (run.trackers: tensorboard)
    wandb/               Weights & Biases' run files (run.trackers: wandb)
    mlflow.db            MLflow's store (run.trackers: mlflow, unless MLFLOW_TRACKING_URI is set)
    mlartifacts/         MLflow's artifacts in that store (only if some are logged)
    checkpoints/         tvlars_scale.checkpoint
    export/              the final model: model.safetensors + model.json (tvlars_scale.export)

:meth:`RunDir.resolve_start` decides, before anything is written, whether the run starts fresh or
resumes and from which checkpoint (:mod:`tvlars_scale.checkpoint.policy`); :meth:`RunDir.start`
then clears a replaced run's files or trims a resumed run's files back to its step (the trackers'
files are kept: TensorBoard appends to its events, wandb and MLflow record each launch as a run of
its own). Only the main process writes.

One writer per run directory: before it looks at the directory, the main process takes an exclusive
``flock`` on the directory itself (:meth:`RunDir.lock`), held until the process ends. The operating
system releases it when the process dies, so a crashed or killed run leaves no stale lock and a
requeued launch just resumes; a second launch while the first is alive (a hand relaunch, a requeue
beside orphaned workers) is refused, naming the holder recorded in ``.owner``. A directory created
only to hold the lock is removed again if the start is refused. On network file systems the lock is
as good as their ``flock`` support (Lustre: mount with ``-o flock``).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tvlars_scale.checkpoint import (
    CHECKPOINTS_DIR,
    CheckpointCorruptError,
    Checkpointer,
    CheckpointInfo,
    complete_checkpoints,
    find_latest_complete,
    remove_leftovers,
    resolve_resume,
)
from tvlars_scale.checkpoint.policy import CONFIG_FILE
from tvlars_scale.config import Config, ConfigError
from tvlars_scale.export import EXPORT_DIR, export_checkpoint
from tvlars_scale.telemetry import LAYER_STATS_FILE

__all__ = [
    "CONFIG_FILE",
    "EXPORT_DIR",
    "METRICS_FILE",
    "MLFLOW_ARTIFACTS_DIR",
    "MLFLOW_DB",
    "OWNER_FILE",
    "RUN_FILES",
    "TENSORBOARD_DIR",
    "WANDB_DIR",
    "RunDir",
]

METRICS_FILE = "metrics.json"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # wandb.init(dir=output_dir) writes its files here
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS_DIR = "mlartifacts"
OWNER_FILE = ".owner"
RUN_FILES = (
    CONFIG_FILE,
    METRICS_FILE,
    TENSORBOARD_DIR,
    WANDB_DIR,
    MLFLOW_DB,
    MLFLOW_ARTIFACTS_DIR,
    LAYER_STATS_FILE,
    CHECKPOINTS_DIR,
    EXPORT_DIR,
)
"""What a run writes at the top of its directory; any of them there means the directory holds a run."""


class RunDir:
    """The run directory of ``config.run.output_dir``; writes happen on the main process only."""

    def __init__(self, config: Config, *, is_main: bool):
        self.config = config
        self.path = Path(config.run.output_dir)
        self.is_main = is_main
        self._lock_fd: int | None = None
        self._created = False  # the directory was made for the lock: remove it if never started
        self._broadcast: Callable[[list], list] | None = None  # resolve_start's, for restore

    def lock(self) -> str | None:
        """Take the run directory's writer lock (main process); ``None`` when taken, else a line
        naming who holds it. Writes nothing but the directory itself when it does not exist."""
        if self.path.exists() and not self.path.is_dir():
            return None  # resolve_start names this error
        if not self.path.exists():
            self.path.mkdir(parents=True)
            self._created = True
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                holder = (self.path / OWNER_FILE).read_text().strip()
            except OSError:
                holder = "a process that has not started writing yet"
            return (
                f"{str(self.path)!r} is in use by another launch ({holder}); wait for it to end or "
                "stop it, or choose another directory"
            )
        self._lock_fd = fd
        return None

    def unlock(self) -> None:
        """Release the lock; a directory made only for it (the start was refused) goes again."""
        if self._lock_fd is None:
            return
        if self._created and not any(self.path.iterdir()):
            self.path.rmdir()
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
        self._lock_fd = None

    def resolve_start(
        self, broadcast: Callable[[list], list] | None = None, *, before_step: int | None = None
    ) -> CheckpointInfo | None:
        """The checkpoint to resume from (None: a new run). Refuses a start that would clobber a
        run or change what a resumed run means; writes nothing.

        Decided on the main process alone (one listing of the checkpoints, the newest manifest),
        then sent by ``broadcast`` (a list holding rank 0's objects on every rank, as Accelerate's
        ``broadcast_object_list``; required with several processes): the other ranks look at
        nothing, and a refusal is raised on every rank. ``before_step``: the newest checkpoint older
        than that step (``resume: auto`` falling back from a corrupt one).
        """
        self._broadcast = broadcast
        outcome: CheckpointInfo | tuple[str, str] | None = None
        if self.is_main:
            try:
                outcome = self._resolve(before_step)
            except ConfigError as error:
                outcome = (error.key, error.problem)  # sent as plain strings, raised everywhere
        if broadcast is not None:
            # collective: broadcast of the main process's outcome (an O(layers) CheckpointInfo).
            [outcome] = broadcast([outcome])
        if isinstance(outcome, tuple):
            raise ConfigError(*outcome)
        return outcome

    def _resolve(self, before_step: int | None) -> CheckpointInfo | None:
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError("run.output_dir", f"{str(self.path)!r} is a file")
        checkpoint = self.config.checkpoint
        return resolve_resume(
            checkpoint.resume,
            self.path,
            self.config.model_dump(mode="json"),
            checkpoint.allow_changes,
            self.config.run.overwrite,
            RUN_FILES,
            before_step,
        )

    def restore(
        self, checkpointer: Checkpointer, info: CheckpointInfo, print_fn: Callable[[str], None]
    ) -> CheckpointInfo:
        """Model, optimizer, RNGs, task, then the loop's counters and data position, from ``info``
        (:meth:`Checkpointer.restore`, on every rank); under ``resume: auto`` a corrupt checkpoint
        gives way to the previous complete one, which the main process finds (:meth:`resolve_start`,
        with the broadcast it was given) and ``print_fn`` announces. Returns the checkpoint
        restored."""
        while True:
            try:
                checkpointer.restore(info, print_fn)
                return info
            except CheckpointCorruptError as error:
                if self.config.checkpoint.resume != "auto":
                    raise
                previous = self.resolve_start(self._broadcast, before_step=info.step)
                if previous is None:
                    raise
                print_fn(
                    f"{error.problem}; resuming from the previous complete checkpoint "
                    f"{previous.path} instead"
                )
                info = previous

    def start(self, resume_from: CheckpointInfo | None, step: int) -> None:
        """Make the directory ready for a run continuing at ``step`` and write the resolved config.

        A new run, or one forked from another run's checkpoint, starts from an empty directory
        (earlier outputs would mix with ours); a run resuming its own checkpoint keeps its files
        up to ``step``.
        """
        if not self.is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._created = False  # the run starts: the directory is its own now
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        owner = f"pid {os.getpid()} on {socket.gethostname()}, started {started}"
        (self.path / OWNER_FILE).write_text(owner + "\n")
        own = (
            resume_from is not None
            and resume_from.path.parent.parent.resolve() == self.path.resolve()
        )
        if own:
            self._trim_to(step)
        else:
            for name in RUN_FILES:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        (self.path / CONFIG_FILE).write_text(self.config.to_yaml())

    def _trim_to(self, step: int) -> None:
        """Drop what the interrupted run wrote past ``step``: torn checkpoint directories, newer
        checkpoints (when run.overwrite allowed a fork), per-layer records written again."""
        checkpoints = self.path / CHECKPOINTS_DIR
        remove_leftovers(checkpoints)
        for info in complete_checkpoints(checkpoints):
            if info.step > step:
                shutil.rmtree(info.path)
        stats = self.path / LAYER_STATS_FILE
        if stats.exists():
            lines = stats.read_text().splitlines(keepends=True)
            stats.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))

    def append_layer_stats(self, record: dict[str, Any]) -> None:
        """One JSON line per log step: the data of the paper's Figure 2 (per-layer norms)."""
        if self.is_main:
            with open(self.path / LAYER_STATS_FILE, "a") as stream:
                stream.write(json.dumps(record) + "\n")

    def export_model(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """The newest complete checkpoint's model as ``export/model.safetensors`` + ``model.json``."""
        if self.is_main:
            latest = find_latest_complete(self.path)
            export_checkpoint(latest.path, self.path / EXPORT_DIR, mean=mean, std=std)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        if self.is_main:
            (self.path / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")

    def hparams(self) -> dict[str, int | float | str | bool]:
        """The config as flat scalars for the trackers (TensorBoard's hparams take no None, lists
        or nesting)."""
        flat = {}
        for section, values in self.config.model_dump(mode="json").items():
            for key, value in values.items():
                scalar = isinstance(value, (int, float, str, bool)) and value is not None
                flat[f"{section}.{key}"] = value if scalar else str(value)
        return flat
