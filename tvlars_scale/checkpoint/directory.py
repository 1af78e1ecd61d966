"""Atomic checkpoint directories: written under a temporary name, published by one rename.

Layout of ``<run>/checkpoints``::

    step-120/          complete: every rank's file, the shared files, checkpoint.json (written last)
    step-160/
    latest             "step-160", written after the rename: for people and tools, never trusted here
    .tmp-step-200/     being written, or torn by a crash: ignored, cleared by the next writer

One save, called by every rank at the same optimizer step:

1. barrier; rank 0 clears a stale ``.tmp-step-N`` and creates it; barrier;
2. every rank writes ``rank-<r>.pt`` and rank 0 the shared files, each under a temporary name,
   fsynced, then renamed inside the directory;
3. barrier: every rank's files are durable;
4. rank 0 checks that every rank's file is there, writes the manifest ``checkpoint.json`` (file
   sizes) last, fsyncs, renames ``.tmp-step-N`` to ``step-N`` (atomic on POSIX), fsyncs the parent,
   then writes ``latest`` and prunes to the newest ``keep_last`` complete checkpoints;
5. barrier: no rank goes on (or exits) before the checkpoint is published.

A directory is complete when its name is ``step-N`` and its manifest lists every rank's file with
the size on disk. DeepSpeed's own ``latest`` file is written before its final barrier and can name a
torn checkpoint; nothing here relies on a pointer. The run directory must be on a file system every
rank sees (one node, or a shared file system across nodes).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tvlars_scale import fault_injection

__all__ = [
    "CHECKPOINTS_DIR",
    "MANIFEST",
    "CheckpointInfo",
    "complete_checkpoints",
    "find_latest_complete",
    "fsync_path",
    "is_temporary",
    "load_file",
    "prune",
    "rank_file",
    "read_manifest",
    "remove_leftovers",
    "replace_directory",
    "save_checkpoint",
    "step_of_name",
    "write_durably",
]

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "checkpoint.json"
LATEST = "latest"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX, _TRASH_PREFIX = ".tmp-", ".trash-"


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint directory and its manifest."""

    path: Path
    step: int
    world_size: int
    metadata: dict[str, Any]


def rank_file(rank: int) -> str:
    """The file every rank writes (its RNG states, its optimizer pieces)."""
    return f"rank-{rank:05d}.pt"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    rank: int,
    world_size: int,
    rank_payload: Any,
    shared_payloads: Mapping[str, Any],
    metadata: Mapping[str, Any],
    keep_last: int,
    barrier: Callable[[], None],
) -> Path:
    """Write this rank's part of checkpoint ``step`` and publish it atomically (see module docstring).

    Every rank calls this at the same point with its own ``rank_payload``; ``shared_payloads``
    (file name -> object) and ``metadata`` (JSON, copied into the manifest) are used on rank 0 only.
    Payloads are written with ``torch.save``; a ``str`` payload is written as UTF-8 text.
    Returns the published directory.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / f"step-{step}"
    staging = root / f"{_TMP_PREFIX}step-{step}"
    barrier()  # collective: barrier, every rank reached the save before rank 0 touches the directory.
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():  # torn by an earlier crash at the same step
            shutil.rmtree(staging)
        staging.mkdir()
    barrier()  # collective: barrier, the staging directory exists before any rank writes into it.
    _write_payload(staging, rank_file(rank), rank_payload)
    if rank == 0:
        for name, payload in shared_payloads.items():
            _write_payload(staging, name, payload)
    barrier()  # collective: barrier, every rank's files are durable before rank 0 publishes.
    fault_injection.kill_if_requested("in_save", step)
    if rank == 0:
        _publish(staging, final, step, world_size, dict(metadata))
        _write_latest(root, final.name)
        prune(root, keep_last)
    barrier()  # collective: barrier, the checkpoint is published before any rank goes on.
    return final


def _write_payload(directory: Path, name: str, payload: Any) -> None:
    if isinstance(payload, str):
        data = payload.encode()
    else:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
    write_durably(directory / name, data)


def write_durably(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: ``path`` is whole or absent, never partial."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def fsync_path(directory: Path) -> None:
    """fsync a file, or a directory to make renames and creations inside it durable (POSIX)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(staging: Path, final: Path, step: int, world_size: int, metadata: dict) -> None:
    names = sorted(p.name for p in staging.iterdir() if not p.name.endswith(".partial"))
    missing = [rank_file(r) for r in range(world_size) if rank_file(r) not in names]
    if missing:
        raise RuntimeError(
            f"checkpoint step {step}: {', '.join(missing)} missing after the barrier in {staging}"
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "files": {name: (staging / name).stat().st_size for name in names},
        "metadata": metadata,
    }
    write_durably(staging / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    fsync_path(staging)
    # The same step may have been saved before (the end-of-training save after a periodic one).
    replace_directory(staging, final)


def replace_directory(staging: Path, final: Path) -> None:
    """Rename the complete, fsynced ``staging`` directory to ``final``, replacing an earlier ``final``.

    The earlier copy is renamed aside first and deleted last: a crash between the two renames
    leaves no ``final``, but both copies complete under other names (``.trash-`` is swept by
    :func:`remove_leftovers`); a failed second rename puts the earlier copy back.
    """
    if final.exists():
        trash = final.with_name(f"{_TRASH_PREFIX}{final.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        try:
            os.rename(staging, final)
        except BaseException:
            os.rename(trash, final)
            raise
        shutil.rmtree(trash)
    else:
        os.rename(staging, final)
    fsync_path(final.parent)


def step_of_name(name: str) -> int | None:
    """The step a ``step-N`` directory name stands for, or ``None`` for any other name."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a directory being written or deleted (torn if a crash left it)."""
    return name.startswith((_TMP_PREFIX, _TRASH_PREFIX))


def _write_latest(root: Path, name: str) -> None:
    write_durably(root / LATEST, (name + "\n").encode())
    fsync_path(root)


def read_manifest(path: str | Path) -> CheckpointInfo | None:
    """The manifest of a complete checkpoint directory, or ``None`` if it is not complete."""
    path = Path(path)
    match = _STEP_DIR.match(path.name)
    if match is None or not path.is_dir():
        return None
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        step, world_size = int(manifest["step"]), int(manifest["world_size"])
        files = manifest["files"]
        if manifest["format_version"] != FORMAT_VERSION or step != int(match.group(1)):
            return None
        if any(rank_file(r) not in files for r in range(world_size)):
            return None
        for name, size in files.items():
            if (path / name).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return CheckpointInfo(path, step, world_size, manifest.get("metadata", {}))


def complete_checkpoints(checkpoints_dir: str | Path) -> list[CheckpointInfo]:
    """Every complete checkpoint under ``checkpoints_dir``, oldest first."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [read_manifest(p) for p in root.iterdir() if _STEP_DIR.match(p.name)]
    return sorted((info for info in found if info is not None), key=lambda info: info.step)


def find_latest_complete(run_dir: str | Path) -> CheckpointInfo | None:
    """The newest complete checkpoint of the run in ``run_dir``; torn and temporary ones are ignored."""
    complete = complete_checkpoints(Path(run_dir) / CHECKPOINTS_DIR)
    return complete[-1] if complete else None


def prune(checkpoints_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (incomplete ones are not counted).

    A directory is renamed away before it is deleted, so a crash mid-deletion never leaves a
    half-deleted ``step-N`` behind.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    for info in complete_checkpoints(checkpoints_dir)[:-keep_last]:
        trash = info.path.with_name(f"{_TRASH_PREFIX}{info.path.name}")
        os.rename(info.path, trash)
        shutil.rmtree(trash)


def remove_leftovers(checkpoints_dir: str | Path) -> list[Path]:
    """Remove temporary and half-deleted directories left by a crash; returns what was removed.

    Call it on one rank while no other process writes checkpoints into this run.
    """
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    removed = []
    for path in root.iterdir():
        if is_temporary(path.name):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
    return removed


def load_file(checkpoint: str | Path, name: str, mmap: bool = False) -> Any:
    """Load one file of a checkpoint (``weights_only``: tensors and plain containers, no code)."""
    path = Path(checkpoint) / name
    if name.endswith((".yaml", ".json", ".txt")):
        return path.read_text()
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
