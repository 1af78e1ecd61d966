"""Atomic checkpoint directories: written under a temporary name, published by one rename.

Layout of ``<run>/checkpoints``::

    step-120/          complete: every rank's file, the shared files, checkpoint.json (written last)
    step-160/
    latest             "step-160", written after the rename: for people and tools, never trusted here
    .tmp-step-200/     being written, or torn by a crash: ignored, cleared by the next writer

One save, called by every rank at the same optimizer step:

1. barrier; rank 0 clears a stale ``.tmp-step-N`` and creates it; barrier;
2. every rank writes ``rank-<r>.pt`` and rank 0 the shared files, each under a temporary name,
   fsynced, then renamed inside the directory; the size and the xxh3-64 checksum of each file are
   taken from the bytes as they are written;
3. one gather: rank 0 receives every rank's (size, checksum), so every rank's file is durable;
4. rank 0 writes the table of rank files ``rank-files.bin`` (16 bytes per rank: size, checksum)
   and the manifest ``checkpoint.json`` (the shared files' sizes and checksums, the saved geometry)
   last, fsyncs, renames ``.tmp-step-N`` to ``step-N`` (atomic on POSIX), fsyncs the parent, then
   writes ``latest`` and prunes to the newest ``keep_last`` complete checkpoints;
5. barrier: no rank goes on (or exits) before the checkpoint is published.

A directory is complete when its name is ``step-N`` and it holds a readable manifest: the manifest is
written last and the directory appears by one rename, so nothing here stats the rank files (an
O(world size) scan per checkpoint). Whether a file is intact is checked where it is read: its size
and checksum against the manifest's (:func:`read_verified`), a rank's record read from
``rank-files.bin`` at its own offset (:func:`rank_record`), so no rank reads a table that grows with
the world size. Checkpoints of format 1 (sizes only, every file in the manifest) still load, their
sizes checked. DeepSpeed's own ``latest`` file is written before its final barrier and can name a
torn checkpoint; nothing here relies on a pointer. The run directory must be on a file system every
rank sees (one node, or a shared file system across nodes).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from tvlars_scale import fault_injection
from tvlars_scale.checkpoint.collectives import Collectives, single_process

__all__ = [
    "CHECKPOINTS_DIR",
    "MANIFEST",
    "RANK_TABLE",
    "CheckpointInfo",
    "CorruptFileError",
    "FileRecord",
    "complete_checkpoints",
    "find_latest_complete",
    "fsync_path",
    "is_temporary",
    "load_bytes",
    "load_file",
    "prune",
    "rank_file",
    "rank_record",
    "rank_records",
    "read_manifest",
    "read_verified",
    "remove_leftovers",
    "replace_directory",
    "save_checkpoint",
    "step_of_name",
    "write_durably",
]

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "checkpoint.json"
RANK_TABLE = "rank-files.bin"
LATEST = "latest"
FORMAT_VERSION = 2
_READABLE_FORMATS = (1, 2)  # 1: sizes of every file in the manifest, no checksums, no geometry
_RECORD = struct.Struct("<QQ")  # a rank file's size and xxh3-64 checksum, at offset 16 x rank
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX, _TRASH_PREFIX = ".tmp-", ".trash-"


@dataclass(frozen=True)
class FileRecord:
    """A file's size and xxh3-64 checksum as written (``checksum`` None: a format-1 checkpoint)."""

    size: int
    checksum: int | None


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint directory and what its manifest says (sent from rank 0 to every rank:
    its size depends on the layer count, never on the world size of a format-2 checkpoint)."""

    path: Path
    step: int
    world_size: int
    metadata: dict[str, Any]
    format_version: int = FORMAT_VERSION
    files: dict[str, FileRecord] | None = None
    """The shared files (format 1: every file) and their records."""
    geometry: dict[str, tuple[int, int]] | None = None
    """Per layer ``(base, chunk)``: rank ``s``'s file holds elements ``[s * chunk - base,
    (s + 1) * chunk - base)`` of it (:mod:`.geometry`); ``None``: unknown, every rank file may hold
    any layer."""


class CorruptFileError(ValueError):
    """A checkpoint file differs from what its manifest recorded: one line naming both."""

    def __init__(self, checkpoint: Path, name: str, problem: str):
        super().__init__(f"checkpoint {checkpoint}: {name} is corrupt ({problem})")
        self.checkpoint, self.name = checkpoint, name


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
    collectives: Collectives | None = None,
    geometry: Mapping[str, tuple[int, int]] | None = None,
) -> Path:
    """Write this rank's part of checkpoint ``step`` and publish it atomically (see module docstring).

    Every rank calls this at the same point with its own ``rank_payload``; ``shared_payloads``
    (file name -> object), ``metadata`` (JSON, copied into the manifest) and ``geometry`` (see
    :class:`CheckpointInfo`) are used on rank 0 only. Payloads are written with ``torch.save``; a
    ``str`` payload is written as UTF-8 text. ``collectives``: over the ranks of the run (``None``:
    one process). Returns the published directory.
    """
    collectives = collectives or single_process()
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / f"step-{step}"
    staging = root / f"{_TMP_PREFIX}step-{step}"
    # collective: barrier, every rank reached the save before rank 0 touches the directory.
    collectives.barrier()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():  # torn by an earlier crash at the same step
            shutil.rmtree(staging)
        staging.mkdir()
    # collective: barrier, the staging directory exists before any rank writes into it.
    collectives.barrier()
    record = _write_payload(staging, rank_file(rank), rank_payload)
    shared = {}
    if rank == 0:
        shared = {name: _write_payload(staging, name, p) for name, p in shared_payloads.items()}
    # collective: gather of one (size, checksum) per rank to rank 0: every rank's file is durable.
    records = collectives.gather(record)
    fault_injection.kill_if_requested("in_save", step)
    pruned: list[str] = []
    if rank == 0:
        _publish(staging, final, step, world_size, records, shared, geometry, dict(metadata))
        _write_latest(root, final.name)
        pruned = _set_aside(root, keep_last)
    # collective: broadcast of what rank 0 set aside: the checkpoint is published before any rank
    # goes on.
    pruned = collectives.broadcast(pruned)
    for name in pruned:  # each rank deletes its own file: no rank unlinks O(world size) files
        (root / name / rank_file(rank)).unlink(missing_ok=True)
    # collective: barrier, every rank's files of the pruned checkpoints are gone.
    collectives.barrier()
    if rank == 0:
        for name in pruned:
            shutil.rmtree(root / name)  # the shared files and the rank table
    return final


def _write_payload(directory: Path, name: str, payload: Any) -> FileRecord:
    if isinstance(payload, str):
        data = payload.encode()
    else:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getbuffer()
    write_durably(directory / name, data)
    return FileRecord(len(data), xxhash.xxh3_64_intdigest(data))


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


def _publish(
    staging: Path,
    final: Path,
    step: int,
    world_size: int,
    records: list[FileRecord],
    shared: dict[str, FileRecord],
    geometry: Mapping[str, tuple[int, int]] | None,
    metadata: dict,
) -> None:
    if len(records) != world_size:
        missing = [rank_file(r) for r in range(len(records), world_size)]
        raise RuntimeError(
            f"checkpoint step {step}: {', '.join(missing)} missing after the gather in {staging}"
        )
    table = b"".join(_RECORD.pack(r.size, r.checksum) for r in records)
    write_durably(staging / RANK_TABLE, table)
    shared = {**shared, RANK_TABLE: FileRecord(len(table), xxhash.xxh3_64_intdigest(table))}
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        # Sizes keyed by name, as in format 1 (tvlars-export reads them); checksums beside them.
        "files": {name: record.size for name, record in sorted(shared.items())},
        "xxh3_64": {name: f"{record.checksum:016x}" for name, record in sorted(shared.items())},
        "geometry": None if geometry is None else {k: list(v) for k, v in geometry.items()},
        "metadata": metadata,
    }
    write_durably(staging / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
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
    """The manifest of a complete checkpoint directory, or ``None`` if it is not complete.

    One file is read; the files it lists are checked where they are loaded (:func:`read_verified`).
    """
    path = Path(path)
    match = _STEP_DIR.match(path.name)
    if match is None:
        return None
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        step, world_size = int(manifest["step"]), int(manifest["world_size"])
        version, sizes = manifest["format_version"], manifest["files"]
        if version not in _READABLE_FORMATS or step != int(match.group(1)) or world_size < 1:
            return None
        if version == 1:
            if any(rank_file(r) not in sizes for r in range(world_size)):
                return None
            files = {name: FileRecord(int(size), None) for name, size in sizes.items()}
            geometry = None
        else:
            checksums = manifest["xxh3_64"]
            files = {name: FileRecord(int(sizes[name]), int(checksums[name], 16)) for name in sizes}
            if RANK_TABLE not in files:
                return None
            saved = manifest["geometry"]
            geometry = (
                None if saved is None else {k: (int(b), int(c)) for k, (b, c) in saved.items()}
            )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return CheckpointInfo(
        path, step, world_size, manifest.get("metadata", {}), version, files, geometry
    )


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``step-N`` entries of ``root``, newest first (one listing, no stat)."""
    if not root.is_dir():
        return []
    with os.scandir(root) as entries:
        found = [(step_of_name(e.name), Path(e.path)) for e in entries]
    return sorted(((step, p) for step, p in found if step is not None), reverse=True)


def complete_checkpoints(checkpoints_dir: str | Path) -> list[CheckpointInfo]:
    """Every complete checkpoint under ``checkpoints_dir``, oldest first (one manifest read each)."""
    found = [read_manifest(p) for _, p in _step_dirs(Path(checkpoints_dir))]
    return [info for info in reversed(found) if info is not None]


def find_latest_complete(
    run_dir: str | Path, before_step: int | None = None
) -> CheckpointInfo | None:
    """The newest complete checkpoint of the run in ``run_dir`` (older than ``before_step`` when
    given); torn and temporary ones are ignored. Lists the directory once and reads manifests
    newest first until one is complete: call it on one rank and broadcast the result."""
    for step, path in _step_dirs(Path(run_dir) / CHECKPOINTS_DIR):
        if before_step is not None and step >= before_step:
            continue
        info = read_manifest(path)
        if info is not None:
            return info
    return None


def prune(checkpoints_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (incomplete ones are not counted).

    A directory is renamed away before it is deleted, so a crash mid-deletion never leaves a
    half-deleted ``step-N`` behind. (A save prunes the same way, each rank deleting its own file.)
    """
    root = Path(checkpoints_dir)
    for name in _set_aside(root, keep_last):
        shutil.rmtree(root / name)


def _set_aside(root: Path, keep_last: int) -> list[str]:
    """Rename all but the newest ``keep_last`` complete checkpoints to ``.trash-step-N`` (swept by
    :func:`remove_leftovers` if a crash leaves them); their new names."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    names = []
    for info in complete_checkpoints(root)[:-keep_last]:
        trash = info.path.with_name(f"{_TRASH_PREFIX}{info.path.name}")
        os.rename(info.path, trash)
        names.append(trash.name)
    return names


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


def rank_record(info: CheckpointInfo, rank: int) -> FileRecord:
    """What the manifest recorded for ``rank``'s file. Format 2: the 16 bytes at ``16 x rank`` of
    ``rank-files.bin``, not the whole table (a damaged record shows as a mismatch of that rank's
    file)."""
    return rank_records(info, [rank])[rank]


def rank_records(info: CheckpointInfo, ranks: list[int]) -> dict[int, FileRecord]:
    """:func:`rank_record` of each of ``ranks``, the table opened once."""
    if info.format_version == 1 or not ranks:
        return {rank: info.files[rank_file(rank)] for rank in ranks}
    records = {}
    with open(info.path / RANK_TABLE, "rb") as table:
        for rank in ranks:
            table.seek(_RECORD.size * rank)
            record = table.read(_RECORD.size)
            if len(record) != _RECORD.size:
                raise CorruptFileError(info.path, RANK_TABLE, f"no record for rank {rank}")
            records[rank] = FileRecord(*_RECORD.unpack(record))
    return records


def read_verified(info: CheckpointInfo, name: str, record: FileRecord | None = None) -> bytes:
    """The bytes of file ``name`` of checkpoint ``info``, checked against ``record`` (default: the
    manifest's record of a shared file). Raises :class:`CorruptFileError` naming the checkpoint and
    the file when the size or the checksum differs."""
    record = record or info.files[name]
    try:
        with open(info.path / name, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise CorruptFileError(info.path, name, "missing") from None
    if len(data) != record.size:
        raise CorruptFileError(info.path, name, f"{len(data)} bytes, {record.size} recorded")
    if record.checksum is not None:
        checksum = xxhash.xxh3_64_intdigest(data)
        if checksum != record.checksum:
            raise CorruptFileError(
                info.path, name, f"xxh3-64 {checksum:016x}, {record.checksum:016x} recorded"
            )
    return data


def load_bytes(data: bytes) -> Any:
    """Deserialize a torch-saved file's bytes (``weights_only``: tensors and plain containers)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_file(checkpoint: str | Path, name: str, mmap: bool = False) -> Any:
    """Load one file of a checkpoint (``weights_only``: tensors and plain containers, no code)."""
    path = Path(checkpoint) / name
    if name.endswith((".yaml", ".json", ".txt")):
        return path.read_text()
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
