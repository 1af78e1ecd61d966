"""The few collectives checkpointing needs, as plain callables a test or a benchmark can stand in for.

Saving and resuming cost every rank the same at any world size: rank 0 alone lists the checkpoint
directory and reads its manifest, the others receive what they need by :attr:`Collectives.broadcast`;
each rank reports its file's size and checksum to rank 0 by one :attr:`Collectives.gather`; the
per-layer geometry of what ranks save is one :attr:`Collectives.all_reduce_max` of ``4 x L``
integers. A resume at another world size reads each saved rank file on one rank and sends every
rank its pieces by one :attr:`Collectives.all_to_all`. Nothing here lists all ranks' files or sends
anything to every rank that grows with the world size.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "Collectives",
    "run_on_threads",
    "single_process",
    "thread_collectives",
    "torch_collectives",
]


@dataclass(frozen=True)
class Collectives:
    """This rank's index, the world size, and the collectives over every rank of the run."""

    rank: int
    world_size: int
    barrier: Callable[[], None]
    gather: Callable[[Any], list | None]
    """Every rank's object, in rank order, on rank 0 (``None`` on the others)."""
    broadcast: Callable[[Any], Any]
    """Rank 0's object, on every rank."""
    all_reduce_max: Callable[[torch.Tensor], torch.Tensor]
    """The elementwise maximum over ranks of an int64 CPU tensor (returned; the argument may change)."""
    all_to_all: Callable[[list], list]
    """``objects[d]`` sent to rank ``d``; returns what every rank sent this one, in rank order
    (``None`` sends nothing). The objects hold tensors and plain containers only."""


def single_process() -> Collectives:
    """One process: every collective is the identity."""
    return Collectives(
        0, 1, lambda: None, lambda obj: [obj], lambda obj: obj, lambda t: t, lambda objs: objs
    )


def torch_collectives(device: torch.device) -> Collectives:
    """The default process group (any backend; ``device`` is where NCCL wants tensors), or
    :func:`single_process` when none is initialised."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return single_process()
    rank, world_size = dist.get_rank(), dist.get_world_size()

    def gather(obj: Any) -> list | None:
        received = [None] * world_size if rank == 0 else None
        # collective: gather_object of one small object per rank to rank 0.
        dist.gather_object(obj, received, dst=0)
        return received

    def broadcast(obj: Any) -> Any:
        box = [obj]
        # collective: broadcast_object_list of rank 0's object.
        dist.broadcast_object_list(box, src=0, device=device)
        return box[0]

    def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
        moved = tensor.to(device)
        # collective: all_reduce(MAX) of a small int64 tensor.
        dist.all_reduce(moved, op=dist.ReduceOp.MAX)
        return moved.cpu()

    def all_to_all(objects: list) -> list:
        # Serialized with torch.save (tensors and containers; loaded back weights_only, no code).
        blobs = []
        for obj in objects:
            buffer = io.BytesIO()
            if obj is not None:
                torch.save(obj, buffer)
            blobs.append(buffer.getvalue())
        sizes = torch.tensor([len(blob) for blob in blobs], dtype=torch.int64)
        # collective: all_to_all_single of one int64 per rank pair (the sizes), then of the bytes.
        received_sizes = torch.empty_like(sizes, device=device)
        dist.all_to_all_single(received_sizes, sizes.to(device))
        received_sizes = received_sizes.cpu().tolist()  # host sync: the split sizes
        sent = torch.frombuffer(bytearray(b"".join(blobs)) or bytearray(1), dtype=torch.uint8)
        received = torch.empty(sum(received_sizes), dtype=torch.uint8, device=device)
        dist.all_to_all_single(
            received, sent[: int(sizes.sum())].to(device), received_sizes, sizes.tolist()
        )
        data, objs, start = received.cpu().numpy().tobytes(), [], 0
        for size in received_sizes:
            blob, start = data[start : start + size], start + size
            objs.append(torch.load(io.BytesIO(blob), weights_only=True) if blob else None)
        return objs

    # collective: barrier over every rank.
    return Collectives(
        rank, world_size, dist.barrier, gather, broadcast, all_reduce_max, all_to_all
    )


def thread_collectives(
    world_size: int, timeout_s: float = 60.0
) -> tuple[list[Collectives], threading.Barrier]:
    """Ranks simulated as threads of one process (tests; ``benchmarks/scale.py``): one
    :class:`Collectives` per rank, real barriers, the gather / broadcast / all-reduce through
    shared slots (the all-to-all passes objects, not bytes); and the barrier, which a failing thread aborts to release the others."""
    barrier = threading.Barrier(world_size)
    slots: list = [None] * world_size
    shared: list = [None]  # what rank 0 sends, read by every thread

    def make(rank: int) -> Collectives:
        def wait() -> None:
            barrier.wait(timeout_s)

        def gather(obj: Any) -> list | None:
            slots[rank] = obj
            wait()
            seen = list(slots) if rank == 0 else None
            wait()  # nobody writes a slot again before rank 0 has read them
            return seen

        def broadcast(obj: Any) -> Any:
            if rank == 0:
                shared[0] = obj
            wait()
            seen = shared[0]
            wait()  # rank 0 sends nothing new before everyone has read it
            return seen

        def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
            slots[rank] = tensor
            wait()
            # Reduced once, by rank 0, and sent (the others wait in broadcast, writing no slot).
            return broadcast(torch.stack(slots).amax(0) if rank == 0 else None)

        def all_to_all(objects: list) -> list:
            slots[rank] = objects
            wait()
            received = [slots[source][rank] for source in range(world_size)]
            wait()
            return received

        return Collectives(rank, world_size, wait, gather, broadcast, all_reduce_max, all_to_all)

    return [make(rank) for rank in range(world_size)], barrier


def run_on_threads(world_size: int, work, timeout_s: float = 60.0) -> list:
    """``work(rank, collectives)`` on ``world_size`` threads standing in for ranks
    (:func:`thread_collectives`); the results in rank order. A failing thread aborts the barrier,
    so the others stop too, and its error is raised here."""
    collectives, barrier = thread_collectives(world_size, timeout_s)
    results, errors = [None] * world_size, []

    def main(rank: int) -> None:
        try:
            results[rank] = work(rank, collectives[rank])
        except BaseException as error:
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=main, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
