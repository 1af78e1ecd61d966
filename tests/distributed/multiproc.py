"""Run a function on real ranks: spawned processes joined in a gloo process group on loopback.

``run_ranks(worker, *args)`` returns every rank's return value (in rank order). The worker must be a
module-level function (the children are spawned and import it). A failing rank raises in the parent
with the child's traceback, and a rank stuck in a collective fails after ``collective_timeout_s``
instead of hanging the suite.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def run_ranks(
    worker: Callable, *args, world_size: int = WORLD_SIZE, collective_timeout_s: float = 120.0
) -> list:
    with tempfile.TemporaryDirectory() as results_dir:
        mp.start_processes(
            _rank_main,
            args=(worker, args, world_size, free_port(), results_dir, collective_timeout_s),
            nprocs=world_size,
            start_method="spawn",
        )
        return [
            torch.load(Path(results_dir) / f"rank{rank}.pt", weights_only=False)
            for rank in range(world_size)
        ]


def _rank_main(rank, worker, args, world_size, port, results_dir, collective_timeout_s) -> None:
    # The variables DeepSpeed and Accelerate read to find their rank, as torchrun would set them.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # two ranks share the machine's cores
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=collective_timeout_s),
    )
    try:
        result = worker(*args)
        torch.save(result, Path(results_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
