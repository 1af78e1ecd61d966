"""Bytes one rank receives at a training log step, counted at a simulated world size.

``log_step_bytes_per_rank(world_size, num_layers)`` runs the trainer's log step (the loss window's
all-reduce and :func:`tvlars_scale.telemetry.main_process_layer_stats`) on one rank of a fake process
group of ``world_size`` ranks (torch's ``FakeProcessGroup``: collectives return at once, so 4,096
ranks fit in one process), after a layer-wise optimizer step over that rank's ZeRO-2 partition of
``num_layers`` layers. Every torch.distributed collective called meanwhile is counted by what it
delivers to the rank: an all-reduce its tensor, an all-gather ``world_size`` inputs, an object
gather ``world_size`` pickles, a broadcast its tensor. Run as a script it prints a table.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch.testing._internal.distributed.fake_pg import FakeStore

from tvlars_scale.optim import TVLARS
from tvlars_scale.optim.sharding import ShardedLayout, TensorLayout
from tvlars_scale.optim.zero_layout import flat_window_pieces
from tvlars_scale.telemetry import LogWindow, main_process_layer_stats

LAYER_NUMEL = 64  # elements per simulated layer: the count does not depend on it


def log_step_bytes_per_rank(world_size: int, num_layers: int, *, rank: int = 0) -> int:
    """Bytes ``rank`` receives at one log step of a ``world_size``-rank ZeRO-2 run of
    ``num_layers`` layers (rank 0 writes the per-layer statistics; any other rank only logs)."""
    with _fake_world(world_size, rank) as state:
        optimizer = _stepped_zero2_rank(world_size, num_layers, rank)
        window = LogWindow(step=0)
        window.add(torch.tensor(2.5))
        with _counting_collectives(world_size) as received:
            window.flush(step=1, global_batch_size=world_size)
            stats = main_process_layer_stats(optimizer, state)
        if rank == 0 and len(stats) != num_layers:
            raise AssertionError(f"rank 0 holds {len(stats)} of {num_layers} layers' statistics")
        return received[0]


@contextlib.contextmanager
def _fake_world(world_size: int, rank: int) -> Iterator[PartialState]:
    # What Accelerate reads to find the (already initialised) process group.
    env = {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    PartialState._reset_state()
    try:
        yield PartialState(cpu=True)
    finally:
        PartialState._reset_state()
        dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def _stepped_zero2_rank(world_size: int, num_layers: int, rank: int) -> TVLARS:
    """A TVLARS optimizer bound to this rank's window of one flat group of ``num_layers`` 2-D
    layers (the tail padded as ZeRO-2 pads it), after one step."""
    total = num_layers * LAYER_NUMEL
    partition = -(-total // (2 * world_size)) * 2
    extents = [(layer, layer * LAYER_NUMEL, LAYER_NUMEL) for layer in range(num_layers)]
    pieces = flat_window_pieces(extents, rank * partition, partition)
    flat = torch.randn(partition, generator=torch.Generator().manual_seed(rank))
    flat.grad = torch.randn(partition, generator=torch.Generator().manual_seed(rank + 1))
    optimizer = TVLARS([flat], lr=1.0)
    layout = ShardedLayout(
        [f"layer{layer}.weight" for layer in range(num_layers)],
        [(8, LAYER_NUMEL // 8)] * num_layers,
        [(flat, TensorLayout(tuple(range(num_layers)), pieces))],
    )
    optimizer.bind_layout(layout)
    optimizer.step()
    return optimizer


@contextlib.contextmanager
def _counting_collectives(world_size: int) -> Iterator[list[int]]:
    received = [0]

    def nbytes(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()

    def counted(name, delivered):
        original = getattr(dist, name)

        def collective(*args, **kwargs):
            received[0] += delivered(*args)
            return original(*args, **kwargs)

        return name, collective

    def gather_objects(output, obj, *_args, **_kwargs):
        # The fake group moves nothing: deliver world_size copies, count their pickles.
        received[0] += world_size * len(pickle.dumps(obj))
        output[:] = [obj] * world_size

    wrappers = dict(
        [
            counted("all_reduce", lambda tensor, *_: nbytes(tensor)),
            counted("broadcast", lambda tensor, *_: nbytes(tensor)),
            counted("all_gather", lambda outputs, *_: sum(nbytes(t) for t in outputs)),
            counted("all_gather_into_tensor", lambda output, *_: nbytes(output)),
            ("all_gather_object", gather_objects),
        ]
    )
    originals = {name: getattr(dist, name) for name in wrappers}
    for name, wrapper in wrappers.items():
        setattr(dist, name, wrapper)
    try:
        yield received
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def main() -> None:
    print("| W | L | bytes received at a log step, rank 0 | other ranks |")
    print("|---|---|---|---|")
    for num_layers in (161, 1000):
        for world_size in (8, 64, 512, 4096):
            main_rank = log_step_bytes_per_rank(world_size, num_layers)
            other = log_step_bytes_per_rank(world_size, num_layers, rank=world_size - 1)
            print(f"| {world_size} | {num_layers} | {main_rank} | {other} |")


if __name__ == "__main__":
    main()
