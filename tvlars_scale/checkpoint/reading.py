"""What each rank reads to resume, so the files a rank opens do not grow with the world size.

Two ways, chosen alike on every rank from the checkpoint's saved geometry and this run's
(:mod:`.geometry`):

* **The same pieces** (the same world size and the same geometry, or a geometry that cannot be
  cut by rank: HSDP replicas, a mesh not in shard order, format-1 checkpoints):
  :func:`read_rank_files` -- a rank reads its own file and the files overlapping its pieces (at the
  same world size, its own file only).
* **Other pieces** (another world size, or another engine): :func:`exchange_rank_files` -- saved
  file ``s`` is read by rank ``s mod W`` alone (``ceil(W_old / W)`` files per rank, its own file
  among them for its random streams), which cuts each saved run by this run's geometry and sends
  every rank its pieces in one all-to-all. The per-layer state that is not elementwise (step
  counters, state key names, shapes) is taken from each layer's first-element file, merged on rank
  0 and broadcast: ``O(layers)`` to every rank. Ranks holding whole layers (one process, DDP) all
  receive every run.

Every file read is checked against the manifest's size and checksum before anything loads, and the
ranks agree on the outcome in one gather and one broadcast: a damaged file stops every rank at the
same point with the same line (:class:`CheckpointCorruptError`).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tvlars_scale.checkpoint.collectives import Collectives
from tvlars_scale.checkpoint.directory import (
    CheckpointInfo,
    CorruptFileError,
    load_bytes,
    rank_file,
    rank_records,
    read_verified,
)
from tvlars_scale.checkpoint.geometry import (
    cut_by_geometry,
    first_element_file,
    first_element_files,
    rank_files_to_read,
    saved_geometry,
)
from tvlars_scale.checkpoint.layer_state import same_values
from tvlars_scale.config import ConfigError
from tvlars_scale.optim.sharding import ShardedLayout

__all__ = [
    "MODEL_FILE",
    "TRAINER_FILE",
    "CheckpointCorruptError",
    "RestoreInputs",
    "exchange_rank_files",
    "read_for_restore",
    "read_rank_files",
]

MODEL_FILE = "model.pt"
TRAINER_FILE = "trainer.pt"


class CheckpointCorruptError(ConfigError):
    """A file of the checkpoint differs from its manifest (size or checksum), found before anything
    was loaded: the run may continue from an earlier checkpoint."""

    def __init__(self, checkpoint, line: str):
        super().__init__("checkpoint.resume", line)
        self.checkpoint = checkpoint


@dataclass
class RestoreInputs:
    """What one rank restores from: its own saved payload (random states, task, buffers; ``None``
    for a rank the checkpoint did not have), the per-layer payloads to merge as ``(where from,
    payload)`` in order, and ``trainer.pt``'s bytes."""

    own: dict | None
    layers: Iterator[tuple[str, dict]]
    trainer: bytes
    rank_files: list[int]
    """The rank files this rank opened."""


def read_for_restore(
    info: CheckpointInfo, layout: ShardedLayout, collectives: Collectives
) -> RestoreInputs:
    """Read what this rank needs to restore ``layout`` from ``info`` (call on every rank)."""
    world_size = collectives.world_size
    if info.geometry is None:
        return _read(info, layout, collectives)
    if layout.sharded:
        # collective: three small all-reduces (this run's geometry), the same on every rank.
        target = saved_geometry(layout, owner=True, collectives=collectives)
        same = world_size == info.world_size and target == info.geometry
        if target is None or same:
            return _read(info, layout, collectives)
        return exchange_rank_files(info, collectives, target)
    if len(rank_files_to_read(info.geometry, layout, info.world_size)) <= 1:
        return _read(info, layout, collectives)  # one file holds every run: no need to send it on
    return exchange_rank_files(info, collectives, None)


def _read(info: CheckpointInfo, layout: ShardedLayout, collectives: Collectives) -> RestoreInputs:
    rank = collectives.rank
    files, order = read_rank_files(info, layout, rank, collectives)
    own = rank if rank < info.world_size else None
    own_payload = files.pop(own) if own is not None else None

    def layers() -> Iterator[tuple[str, dict]]:
        for r in order:  # each unpickled in turn, released once merged
            payload = own_payload if r == own else load_bytes(files.pop(r))
            yield rank_file(r), payload.pop("layers")

    return RestoreInputs(own_payload, layers(), files.pop(TRAINER_FILE), list(order))


def _agree(problem: str | None, collectives: Collectives, info: CheckpointInfo) -> None:
    # collective: gather of one line (or None) per rank to rank 0.
    problems = collectives.gather(problem)
    first = next((p for p in problems if p), None) if problems is not None else None
    # collective: broadcast of rank 0's verdict.
    first = collectives.broadcast(first)
    if first is not None:
        raise CheckpointCorruptError(info.path, first)


def _read_problem(error: Exception, info: CheckpointInfo) -> str:
    if isinstance(error, CorruptFileError):
        return str(error)
    return f"checkpoint {info.path}: " + " ".join(str(error).split())


_READ_ERRORS = (CorruptFileError, OSError, RuntimeError, pickle.UnpicklingError, EOFError)


def _stateless_layers(layout: ShardedLayout, own_layers: dict | None) -> list[str]:
    """Layers of tensors this rank holds no run of, whose per-tensor state (step counters) its own
    saved payload does not carry: no file of runs brings it."""
    names, carried = layout.layer_names, (own_layers or {}).get("scalars", {})
    empty = [entry for _, entry in layout.items() if not any(p.numel for p in entry.pieces)]
    return sorted({names[layer] for entry in empty for layer in entry.layers} - carried.keys())


def read_rank_files(
    info: CheckpointInfo, layout: ShardedLayout, rank: int, collectives: Collectives
) -> tuple[dict[int | str, Any], list[int]]:
    """Read and check every file ``rank`` needs to restore ``layout`` from ``info`` itself, before
    anything is loaded; the ranks agree on the outcome.

    Returns the files (rank index -> bytes; its own file already unpickled, as it decides what
    else is needed; ``trainer.pt``'s bytes) and the rank files to merge, in order: its own, those
    overlapping its pieces (:func:`.geometry.rank_files_to_read`), then -- only for layers it holds
    none of and its own file has no step counters for -- those with their first element.
    """
    own = rank if rank < info.world_size else None
    order = rank_files_to_read(info.geometry, layout, info.world_size)
    files: dict[int | str, Any] = {}
    problem = None
    try:
        wanted = sorted({*order, *([] if own is None else [own])})
        records = rank_records(info, wanted)
        for r in wanted:
            files[r] = read_verified(info, rank_file(r), records[r])
        if own is not None:
            files[own] = load_bytes(files[own])
            order = [own] + [r for r in order if r != own]
        missing = _stateless_layers(layout, files[own]["layers"] if own is not None else None)
        more = first_element_files(info.geometry, missing, info.world_size)
        more = [r for r in more if r not in files]
        for r, record in rank_records(info, more).items():
            files[r] = read_verified(info, rank_file(r), record)
            order.append(r)
        files[TRAINER_FILE] = _read_shared(info, rank)
    except _READ_ERRORS as error:
        problem = _read_problem(error, info)
    _agree(problem, collectives, info)
    return files, order


def _read_shared(info: CheckpointInfo, rank: int) -> bytes:
    """``trainer.pt``'s bytes; rank 0 also checks ``model.pt`` (the others memory-map it, FSDP2
    touching its rows only: one check suffices)."""
    trainer = read_verified(info, TRAINER_FILE)
    if rank == 0:
        read_verified(info, MODEL_FILE)
    return trainer


def _cut(run: dict, first: int, end: int) -> dict:
    """Elements ``[first, end)`` of the layer, from a saved run that holds them: every elementwise
    value of the run (the weights, the optimizer state, any other) cut alike."""
    begin, count = first - run["offset"], end - first

    def cut(value):
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value.narrow(0, begin, count).clone() if torch.is_tensor(value) else value

    return {**{k: cut(v) for k, v in run.items()}, "offset": first, "numel": count}


def exchange_rank_files(
    info: CheckpointInfo,
    collectives: Collectives,
    target: Mapping[str, tuple[int, int]] | None,
) -> RestoreInputs:
    """Rank ``r`` reads saved files ``r, r + W, r + 2W, ...``, cuts their runs by ``target`` (this
    run's geometry; ``None``: every rank holds whole layers and gets every run) and sends each rank
    its pieces in one all-to-all. See the module docstring."""
    rank, world_size = collectives.rank, collectives.world_size
    mine = list(range(rank, info.world_size, world_size))
    outbox: list[list[dict]] = [[] for _ in range(world_size)]
    # Per layer, from the file holding its first element: shape, step counters, state key names.
    meta: dict[str, dict] = {"shapes": {}, "scalars": {}, "state_keys": {}}
    own_payload, trainer, problem = None, b"", None
    try:
        records = rank_records(info, mine)
        for saved in mine:
            payload = load_bytes(read_verified(info, rank_file(saved), records[saved]))
            layers = payload.pop("layers")
            if saved == rank:
                own_payload = payload
            for key in meta:
                for name, value in layers.get(key, {}).items():
                    first = name not in info.geometry or saved == first_element_file(
                        info.geometry, name, info.world_size
                    )
                    if first:  # layers no run holds (empty) come from every file: rank 0 checks
                        meta[key].setdefault(name, value)
            for run in layers["runs"]:
                if target is None:  # every rank holds every layer whole: the run as it is
                    for runs in outbox:
                        runs.append(run)
                    continue
                cuts = cut_by_geometry(
                    target, run["layer"], run["offset"], run["numel"], world_size
                )
                for destination, first, end in cuts:
                    outbox[destination].append(_cut(run, first, end))
            del payload, layers  # released before the next file is read
        trainer = _read_shared(info, rank)
    except _READ_ERRORS as error:
        problem = _read_problem(error, info)
    _agree(problem, collectives, info)
    # collective: gather of each rank's first-element layer state to rank 0 (O(layers) in all).
    gathered = collectives.gather(meta)
    merged = _merge_meta(gathered) if gathered is not None else None
    # collective: broadcast of the merged per-layer state (O(layers)).
    merged = collectives.broadcast(merged)
    if isinstance(merged, str):
        raise ValueError(merged)  # every rank: the checkpoint cannot be restored as it is
    # collective: all_to_all of the cut runs: each rank receives its own pieces.
    received = collectives.all_to_all([runs or None for runs in outbox])
    del outbox

    def layers() -> Iterator[tuple[str, dict]]:
        yield "the per-layer state", {**merged, "runs": []}
        for source, runs in enumerate(received):
            if runs:
                yield f"the pieces rank {source} read", {
                    "shapes": {}, "scalars": {}, "state_keys": {}, "runs": runs
                }  # fmt: skip
                received[source] = None  # released once merged

    return RestoreInputs(own_payload, layers(), trainer, mine)


def _merge_meta(gathered: list[dict]) -> dict | str:
    """Rank 0: every rank's first-element layer state in one (or the line naming a disagreement)."""
    merged: dict[str, dict] = {"shapes": {}, "scalars": {}, "state_keys": {}}
    for meta in gathered:
        for key, values in meta.items():
            for name, value in values.items():
                known = merged[key].setdefault(name, value)
                same = same_values(known, value) if key == "scalars" else known == value
                if not same:
                    return f"saved ranks disagree on the {key} of {name}"
    return merged
