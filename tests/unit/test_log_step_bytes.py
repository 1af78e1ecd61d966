"""A log step's traffic per rank does not grow with the world size or the layer count
(benchmarks/log_step_bytes.py: the trainer's log step on one rank of a fake 4,096-rank group)."""

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

spec = importlib.util.spec_from_file_location(
    "log_step_bytes", REPO_ROOT / "benchmarks" / "log_step_bytes.py"
)
log_step_bytes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(log_step_bytes)


def test_bytes_received_at_a_log_step_do_not_depend_on_world_size_or_layers():
    counts = {
        (world_size, num_layers, rank): log_step_bytes.log_step_bytes_per_rank(
            world_size, num_layers, rank=rank
        )
        for world_size in (8, 4096)
        for num_layers in (161, 1000)
        for rank in (0, world_size - 1)
    }
    # One all-reduce of the loss window's scalar: a few bytes, the same everywhere (before: every
    # rank received each rank's per-layer dictionary, W x L entries).
    assert len(set(counts.values())) == 1, counts
    assert next(iter(counts.values())) <= 8
