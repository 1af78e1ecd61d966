"""Which rank file holds which elements of each layer, so a resume opens only the files it needs.

Every way this project shards a layer cuts it into equal runs, one per rank in rank order, the
first possibly shorter: ZeRO-1/2 windows of one flat buffer (``chunk`` the partition size, ``base``
the layer's offset in the buffer), ZeRO-3 slots of ``ceil(numel / W)`` elements, FSDP2 blocks of
``ceil(rows / W)`` rows (``base`` 0), or one owner holding everything (rank 0, ``chunk`` the layer's
size). One pair per layer describes all of them: rank ``s``'s file holds elements
``[s * chunk - base, (s + 1) * chunk - base)`` of the layer (clipped to it).

The pairs are derived from the pieces the ranks save, not from the parallel setting: ``chunk`` is
the longest run of the layer on any rank (a layer cut in two has no full run, but any length at
least as long as both halves places them the same), ``base`` follows from any run that does not
start the layer. Every rank then checks that its own runs lie where the pair puts them; if any does
not (a mesh whose saving ranks are not numbered in shard order), the checkpoint records no geometry
and a resume reads every rank file, as format-1 checkpoints do. Computed once per run: two
all-reduces of ``L`` and ``3 x L`` integers and one of a flag, the same cost at any world size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from tvlars_scale.checkpoint.collectives import Collectives
from tvlars_scale.optim.sharding import ShardedLayout

__all__ = [
    "cut_by_geometry",
    "first_element_file",
    "first_element_files",
    "rank_files_to_read",
    "saved_geometry",
]

_NONE = -(2**62)  # below any real value: "this rank says nothing about the layer"


def _owned_runs(layout: ShardedLayout, owner: bool) -> Iterable[tuple[int, int, int]]:
    """``(layer, layer offset, numel)`` of every run this rank saves."""
    if not owner:
        return
    for _, entry in layout.items():
        for piece in entry.pieces:
            if piece.numel:
                yield piece.layer, piece.layer_offset, piece.numel


def saved_geometry(
    layout: ShardedLayout, *, owner: bool, collectives: Collectives
) -> dict[str, tuple[int, int]] | None:
    """Per layer name ``(base, chunk)`` of what the ranks save (see the module docstring), the same
    on every rank; ``None`` when the runs do not follow one such rule. Call on every rank."""
    rank, names = collectives.rank, layout.layer_names
    runs = list(_owned_runs(layout, owner))
    longest = [_NONE] * len(names)
    for layer, _, numel in runs:
        longest[layer] = max(longest[layer], numel)
    # collective: all_reduce(MAX) of one int64 per layer.
    chunks = collectives.all_reduce_max(torch.tensor(longest, dtype=torch.int64)).tolist()
    # Rows: the exact base (as max and as -min, to see disagreement), a lower bound from runs that
    # start their layer (the layer starts inside this rank's chunk).
    bounds = [[_NONE] * len(names) for _ in range(3)]
    for layer, offset, _ in runs:
        if offset > 0:
            exact = rank * chunks[layer] - offset
            bounds[0][layer] = max(bounds[0][layer], exact)
            bounds[1][layer] = max(bounds[1][layer], -exact)
        else:
            bounds[2][layer] = max(bounds[2][layer], rank * chunks[layer])
    # collective: all_reduce(MAX) of three int64 per layer.
    high, low, lower = collectives.all_reduce_max(torch.tensor(bounds, dtype=torch.int64)).tolist()
    geometry: dict[str, tuple[int, int]] = {}
    consistent = True
    for layer, name in enumerate(names):
        chunk = chunks[layer]
        if chunk == _NONE:
            continue  # no rank saves a run of it (an empty layer): nothing to find
        if high[layer] != _NONE:
            consistent &= high[layer] == -low[layer] and high[layer] >= lower[layer]
            geometry[name] = (high[layer], chunk)
        else:
            geometry[name] = (lower[layer], chunk)
    if consistent:
        for layer, offset, numel in runs:
            base, chunk = geometry[names[layer]]
            consistent &= (
                rank * chunk - base <= offset and offset + numel <= (rank + 1) * chunk - base
            )
    # collective: all_reduce(MAX) of one flag: does any rank's run lie elsewhere?
    failed = collectives.all_reduce_max(torch.tensor([0 if consistent else 1], dtype=torch.int64))
    return None if int(failed[0]) else geometry


def rank_files_to_read(
    geometry: Mapping[str, tuple[int, int]] | None, layout: ShardedLayout, saved_world_size: int
) -> list[int]:
    """The saved ranks whose files hold a run of this rank's ``layout``, ascending (without a
    geometry: every rank file)."""
    if geometry is None:
        return list(range(saved_world_size))
    names, needed = layout.layer_names, set()
    for _, entry in layout.items():
        for piece in entry.pieces:
            name = names[piece.layer]
            if piece.numel and name in geometry:  # a layer not saved: restoring names it
                base, chunk = geometry[name]
                low = (piece.layer_offset + base) // chunk
                high = (piece.layer_offset + piece.numel - 1 + base) // chunk
                needed.update(range(max(low, 0), min(high, saved_world_size - 1) + 1))
    return sorted(needed)


def first_element_file(geometry: Mapping[str, tuple[int, int]], name: str, world_size: int) -> int:
    """The rank of ``geometry`` whose run holds the first element of layer ``name``."""
    base, chunk = geometry[name]
    return min(base // chunk, world_size - 1)


def first_element_files(
    geometry: Mapping[str, tuple[int, int]] | None, layers: Iterable[str], saved_world_size: int
) -> list[int]:
    """The saved ranks holding the first element of each of ``layers``: their files carry the
    layers' per-tensor state (step counters), which a rank holding none of a layer still needs."""
    if geometry is None:
        return list(range(saved_world_size))
    return sorted(
        {
            first_element_file(geometry, name, saved_world_size)
            for name in layers
            if name in geometry  # a layer not saved: restoring names it
        }
    )


def cut_by_geometry(
    geometry: Mapping[str, tuple[int, int]], name: str, offset: int, numel: int, world_size: int
) -> Iterable[tuple[int, int, int]]:
    """``(rank, first, end)``: the elements ``[first, end)`` of layer ``name`` that each rank of
    ``geometry`` holds among ``[offset, offset + numel)`` (none when no rank holds the layer)."""
    if name not in geometry or not numel:
        return
    base, chunk = geometry[name]
    low = max((offset + base) // chunk, 0)
    high = min((offset + numel - 1 + base) // chunk, world_size - 1)
    for rank in range(low, high + 1):
        first = max(offset, rank * chunk - base)
        end = min(offset + numel, (rank + 1) * chunk - base)
        if first < end:
            yield rank, first, end
