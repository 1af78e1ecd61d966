"""Resume policy: which checkpoint a run continues from, and whether its config may.

Decided before anything is written, so a refused start leaves the run directory untouched:

* ``checkpoint.resume: null`` starts a new run; a run directory that already holds one is refused
  unless ``run.overwrite`` is set.
* ``checkpoint.resume: auto`` continues from the newest complete checkpoint of ``run.output_dir``.
  Without one it starts a new run (the first launch of a job that the scheduler may requeue), but
  not over a different run's outputs.
* ``checkpoint.resume: <path>`` continues from that checkpoint (``.../checkpoints/step-N``) or from
  the newest complete one of that run directory.

The config may change what does not change the run's meaning (logging, checkpointing, micro batch
size, the dataset's location: :data:`OPERATIONAL_KEYS`). Any other difference from the checkpoint's
config (global batch, optimizer and its hyperparameters, model, dataset, epochs, seed...) is refused
unless the key is listed in ``checkpoint.allow_changes``. The world size is not part of the config:
it may change freely (the global batch is kept, accumulation is re-derived).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from tvlars_scale.checkpoint.directory import (
    CHECKPOINTS_DIR,
    CheckpointInfo,
    complete_checkpoints,
    find_latest_complete,
    read_manifest,
)
from tvlars_scale.config import Config, ConfigError

__all__ = [
    "CONFIG_FILE",
    "OPERATIONAL_KEYS",
    "check_allowed_changes",
    "config_changes",
    "resolve_resume",
]

CONFIG_FILE = "config.yaml"
"""The resolved config, in every checkpoint and at the top of the run directory."""

OPERATIONAL_KEYS = frozenset(
    {
        "run.output_dir",
        "run.overwrite",
        "run.eval_every",
        "run.log_every",
        "run.trackers",
        "run.tensorboard",  # retired by run.trackers; still in the configs of older checkpoints
        "run.progress_bar",
        "run.max_nonfinite_steps",
        "run.collective_timeout_s",
        "run.compile",  # the throughput levers: the same model, computed faster
        "run.compile_mode",
        "run.compile_regional",
        "run.profile",
        "run.profile.start_step",
        "run.profile.num_steps",
        # The moving average beside the weights: they train the same with or without it; switched
        # on at a resume, it starts from the checkpoint's weights.
        "run.ema",
        "run.ema.decay",
        "run.ema.warmup_steps",
        "run.ema.every_steps",
        "model.channels_last",
        "batch.micro_batch_size",
        "data.path",
        "data.index",
    }
)
"""Keys that may differ on resume: how the run is watched, stored and fitted into memory, not what
it computes. Every ``checkpoint.*`` key is operational too."""


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_operational(key: str) -> bool:
    return key in OPERATIONAL_KEYS or key.startswith("checkpoint.")


def config_changes(
    saved: Mapping[str, Any], current: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every meaningful key that differs (absent: None).

    A key the saved config does not have (a checkpoint written before the key existed) is no change
    while it holds its default: defaults keep what the run did before they were added."""
    old, new = _flatten(saved), _flatten(current)
    defaults = _flatten(Config().model_dump(mode="json"))
    return [
        (key, old.get(key), new.get(key))
        for key in sorted(old.keys() | new.keys())
        if not _is_operational(key)
        and old.get(key) != new.get(key)
        and not (key not in old and key in defaults and new.get(key) == defaults[key])
    ]


def check_allowed_changes(
    saved: Mapping[str, Any], current: Mapping[str, Any], allowed: Iterable[str], where: str
) -> None:
    """Raise ``ConfigError`` on the first meaningful change not listed in ``allowed``."""
    allowed = set(allowed)
    # A changed optim.name / task.name explains the keys of the section that come and go with it.
    changes = sorted(
        config_changes(saved, current), key=lambda change: change[0].count(".name") == 0
    )
    for key, old, new in changes:
        if key not in allowed:
            raise ConfigError(
                key,
                f"is {new!r} but {where} was trained with {old!r}; this changes what the run means "
                f"(add {key} to checkpoint.allow_changes to resume anyway)",
            )


def _saved_config(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError("checkpoint.resume", f"cannot read {str(path)!r}: {error}") from None


def _explicit(path_text: str) -> CheckpointInfo:
    path = Path(path_text)
    if not path.exists():
        raise ConfigError("checkpoint.resume", f"{path_text!r} does not exist")
    info = read_manifest(path)
    if info is None:
        candidates = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
        complete = complete_checkpoints(candidates)
        if not complete:
            raise ConfigError(
                "checkpoint.resume",
                f"{path_text!r} is not a complete checkpoint and holds none (torn or temporary "
                "checkpoints are never resumed)",
            )
        info = complete[-1]
    return info


def resolve_resume(
    resume: str | None,
    run_dir: str | Path,
    current_config: Mapping[str, Any],
    allowed: Iterable[str],
    overwrite: bool,
    run_files: Iterable[str],
    before_step: int | None = None,
) -> CheckpointInfo | None:
    """The checkpoint to continue from (``None``: start a new run), after every check.

    ``current_config`` is the resolved config as a plain mapping; ``run_files`` are the names a run
    writes at the top of its directory (their presence means the directory holds a run).
    ``before_step`` (``resume: auto`` only): the newest complete checkpoint older than that step,
    the one to fall back to when the newest turned out corrupt. Lists the checkpoints directory once
    and reads manifests newest first: call it on one rank. Raises ``ConfigError`` when the start
    must be refused.
    """
    run_dir = Path(run_dir)
    existing = [name for name in run_files if (run_dir / name).exists()]
    if resume is None:
        if existing and not overwrite:
            raise ConfigError(
                "run.output_dir",
                f"{str(run_dir)!r} already holds a run ({', '.join(existing)}); set "
                "checkpoint.resume=auto to continue it, run.overwrite=true to replace it, or "
                "choose another directory",
            )
        return None
    if resume == "auto":
        info = find_latest_complete(run_dir, before_step)
        if info is None:
            if existing and not overwrite and (run_dir / CONFIG_FILE).exists():
                # Killed before its first checkpoint: start again, but only the same run.
                check_allowed_changes(
                    _saved_config(run_dir / CONFIG_FILE),
                    current_config,
                    allowed,
                    f"the run in {str(run_dir)!r} (which has no complete checkpoint)",
                )
            elif existing and not overwrite:
                raise ConfigError(
                    "run.output_dir",
                    f"{str(run_dir)!r} holds outputs ({', '.join(existing)}) but no config.yaml "
                    "and no checkpoint; set run.overwrite=true to replace them",
                )
            return None
    else:
        info = _explicit(resume)
        own_dir = info.path.parent.parent.resolve() == run_dir.resolve()
        if not own_dir and existing and not overwrite:
            raise ConfigError(
                "run.output_dir",
                f"{str(run_dir)!r} already holds another run ({', '.join(existing)}); resume into "
                "an empty directory or set run.overwrite=true",
            )
        newest = find_latest_complete(run_dir) if own_dir else None
        if newest is not None and newest.step > info.step and not overwrite:
            raise ConfigError(
                "checkpoint.resume",
                f"{info.path.name} is older than {newest.path.name} of the same run: continuing "
                "from it would fork the run; resume into another run.output_dir, or set "
                "run.overwrite=true to discard the newer checkpoints",
            )
    check_allowed_changes(
        _saved_config(info.path / CONFIG_FILE), current_config, allowed, f"checkpoint {info.path}"
    )
    return info
