"""A run directory: which files a run owns, starting / refusing / overwriting / resuming in it,
and the files the loop writes there.

``<run.output_dir>/`` holds::

    config.yaml          the resolved config (written at start)
    metrics.json         final and per-evaluation metrics (written at the end)
    layer_stats.jsonl    per-layer weight / update norms and trust ratios per log step
    tensorboard/         Accelerate's TensorBoard tracker
    checkpoints/         tvlars_scale.checkpoint

:meth:`RunDir.resolve_start` decides, before anything is written, whether the run starts fresh or
resumes and from which checkpoint (:mod:`tvlars_scale.checkpoint.policy`); :meth:`RunDir.start`
then clears a replaced run's files or trims a resumed run's files back to its step. Only the main
process writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tvlars_scale.checkpoint import (
    CHECKPOINTS_DIR,
    CheckpointInfo,
    complete_checkpoints,
    remove_leftovers,
    resolve_resume,
)
from tvlars_scale.checkpoint.policy import CONFIG_FILE
from tvlars_scale.config import Config, ConfigError
from tvlars_scale.telemetry import LAYER_STATS_FILE

__all__ = ["CONFIG_FILE", "METRICS_FILE", "RUN_FILES", "TENSORBOARD_DIR", "RunDir"]

METRICS_FILE = "metrics.json"
TENSORBOARD_DIR = "tensorboard"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, TENSORBOARD_DIR, LAYER_STATS_FILE, CHECKPOINTS_DIR)
"""What a run writes at the top of its directory; any of them there means the directory holds a run."""


class RunDir:
    """The run directory of ``config.run.output_dir``; writes happen on the main process only."""

    def __init__(self, config: Config, *, is_main: bool):
        self.config = config
        self.path = Path(config.run.output_dir)
        self.is_main = is_main

    def resolve_start(self) -> CheckpointInfo | None:
        """The checkpoint to resume from (None: a new run). Refuses a start that would clobber a
        run or change what a resumed run means; writes nothing."""
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
        )

    def start(self, resume_from: CheckpointInfo | None, step: int) -> None:
        """Make the directory ready for a run continuing at ``step`` and write the resolved config.

        A new run, or one forked from another run's checkpoint, starts from an empty directory
        (earlier outputs would mix with ours); a run resuming its own checkpoint keeps its files
        up to ``step``.
        """
        if not self.is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
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
