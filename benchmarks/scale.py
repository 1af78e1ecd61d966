"""Per-rank file-system work of checkpoint start-up, save and restore at simulated world sizes.

Scale is counted, not timed: for W in {8, 64, 512, 4096} and four saved geometries -- ResNet-50
(161 parameters) under ZeRO-2 and ZeRO-3, FSDP2 with ResNet-50's 161 and with a 1,000-layer
transformer's parameters -- this writes real checkpoints through the library's own save path and
counts, per rank, the files opened, directory entries listed, stats and bytes read by:

* start-up (``resume: auto``): ``RunDir.resolve_start`` on the main process and on another rank,
  over a run holding its newest checkpoint of W rank files (``keep_last`` = 1);
* save: what rank 0 does to the checkpoint directory while publishing (listing, stats);
* restore: ``read_for_restore`` (what ``Checkpointer.restore`` reads, checks and, at another world
  size, exchanges) on every rank of a world of the same W, of 3W/4 and of W/8 ranks, then the
  per-layer merge (``restore_layer_state``), whose values are checked, so a rank that got too few
  pieces fails.

How ranks are simulated (honestly, in one process): saving runs every one of the W ranks as a
thread calling ``save_checkpoint`` and ``saved_geometry`` with ``thread_collectives`` (real
barriers; the gather, broadcast and all-reduce through shared memory instead of a network).
Restore runs every rank of the restarted world as a thread the same way (the all-to-all passes
objects through shared memory). Start-up runs the main process and one other rank, the other's
broadcast standing in for the main process's answer. File-system calls are counted by
wrapping ``open`` / ``io.open`` (calls and bytes read), ``os.stat`` and ``os.scandir`` /
``os.listdir`` (entries yielded) per thread; ``model.pt`` is a placeholder (the model is not built:
at restore rank 0 checks it and every rank memory-maps it, FSDP2 ranks touching their rows only).

Tensors are small: ZeRO sizes are ResNet-50's parameter sizes divided by 64 (the cut pattern of a
flat buffer scales with its size), FSDP2 tensors have ResNet-50's / the transformer's row counts
with one element per row (FSDP2 cuts rows: the element count per row changes no count here).
Optimizer state: one momentum buffer and a step counter per tensor, as TVLARS keeps.

Two more sections, each the library's own code at a simulated W: the dataset index
(``follower_startup_entries`` of tests/distributed/listing.py: a 1,281,167-entry ImageNet index is
written as rank 0 would, then opened as every other rank does, counting directory entries listed)
and a log step (``log_step_bytes_per_rank`` of benchmarks/log_step_bytes.py: the trainer's log step
on one rank of torch's fake process group of W ranks, counting the bytes its collectives deliver, for
L = 161 and 1,000 layers). ``--sections`` picks which run (``checkpoint`` is the hour-long one).

Slopes are d ln(count + 1) / d ln W between W = 512 and W = 4096: 0 means the per-rank cost does not
grow with the world size, 1 that it grows linearly. Prints a table, then ONE JSON line.
``python benchmarks/scale.py [--world-sizes 8 64 512 4096] [--cases ...]`` (about an hour on 2
loaded CPU cores, most of it W = 4096's saves).
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import importlib.util
import io
import json
import math
import os
import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

from tvlars_scale.checkpoint.collectives import Collectives, run_on_threads
from tvlars_scale.checkpoint.directory import CHECKPOINTS_DIR, save_checkpoint
from tvlars_scale.checkpoint.geometry import saved_geometry
from tvlars_scale.checkpoint.layer_state import capture_layer_state, restore_layer_state
from tvlars_scale.checkpoint.reading import read_for_restore
from tvlars_scale.config import Config
from tvlars_scale.optim import Piece, ShardedLayout, TensorLayout
from tvlars_scale.optim.zero_layout import flat_window_pieces, split_param_pieces
from tvlars_scale.run_dir import RunDir

SECTIONS = ["dataset", "log_step", "checkpoint"]
KEEP_LAST = 1  # checkpoints kept: each save after the first prunes one
ZERO_SCALE = 64  # ZeRO tensors: ResNet-50's sizes / 64


HERE = Path(__file__).resolve().parent
IMAGENET_TRAIN = 1_281_167


def _load(name: str, path: Path):
    """A helper module of this repository that is not part of the package, by its path."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# --- counting ---------------------------------------------------------------------------------
class _Counter:
    """Per-thread counts of file-system calls while active."""

    def __init__(self) -> None:
        self.counts: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def of(self, thread: int | None = None) -> dict[str, int]:
        return dict(self.counts[thread or threading.get_ident()])

    def reset(self) -> None:
        self.counts.clear()

    def _add(self, key: str, n: int = 1) -> None:
        self.counts[threading.get_ident()][key] += n


class _CountedFile:
    def __init__(self, handle, counter: _Counter):
        self._handle, self._counter = handle, counter

    def read(self, *args):
        data = self._handle.read(*args)
        self._counter._add("bytes_read", len(data))
        return data

    def readinto(self, buffer):
        n = self._handle.readinto(buffer)
        self._counter._add("bytes_read", n or 0)
        return n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._handle, name)


@contextlib.contextmanager
def counting():
    counter = _Counter()
    originals = {
        "open": builtins.open,
        "io_open": io.open,
        "stat": os.stat,
        "scandir": os.scandir,
        "listdir": os.listdir,
    }

    def opened(original):
        def call(file, mode="r", *args, **kwargs):
            counter._add("opens")
            if "r" in mode and "b" in mode:
                return _CountedFile(original(file, mode, *args, **kwargs), counter)
            handle = original(file, mode, *args, **kwargs)
            if "r" in mode:
                return _CountedFile(handle, counter)
            return handle

        return call

    def stat(path, *args, **kwargs):
        counter._add("stats")
        return originals["stat"](path, *args, **kwargs)

    class _Listing:
        def __init__(self, iterator):
            self._iterator = iterator

        def __iter__(self):
            for entry in self._iterator:
                counter._add("entries_listed")
                yield entry

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            close = getattr(self._iterator, "close", None)
            if close:
                close()

    def scandir(path="."):
        return _Listing(originals["scandir"](path))

    def listdir(path="."):
        names = originals["listdir"](path)
        counter._add("entries_listed", len(names))
        return names

    builtins.open, io.open = opened(originals["open"]), opened(originals["io_open"])
    os.stat, os.scandir, os.listdir = stat, scandir, listdir
    try:
        yield counter
    finally:
        builtins.open, io.open = originals["open"], originals["io_open"]
        os.stat, os.scandir, os.listdir = (
            originals["stat"],
            originals["scandir"],
            originals["listdir"],
        )


# --- geometries -------------------------------------------------------------------------------
def resnet50_shapes() -> list[tuple[str, tuple[int, ...]]]:
    from torchvision.models import resnet50

    with torch.device("meta"):
        model = resnet50()
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def transformer_shapes(num_layers: int = 1000) -> list[tuple[str, tuple[int, ...]]]:
    """A ViT-L-like block's 10 parameters (d = 1024, MLP 4096), repeated to ``num_layers``."""
    block = [
        ("qkv.weight", (3072, 1024)),
        ("qkv.bias", (3072,)),
        ("proj.weight", (1024, 1024)),
        ("proj.bias", (1024,)),
        ("fc1.weight", (4096, 1024)),
        ("fc1.bias", (4096,)),
        ("fc2.weight", (1024, 4096)),
        ("fc2.bias", (1024,)),
        ("norm.weight", (1024,)),
        ("norm.bias", (1024,)),
    ]
    return [
        (f"blocks.{i // len(block)}.{block[i % len(block)][0]}", block[i % len(block)][1])
        for i in range(num_layers)
    ]


def _zero2(shapes, world_size: int, rank: int) -> ShardedLayout:
    """Two flat groups (>= 2-D weights, 1-D parameters), each cut into W equal windows."""
    names = [n for n, _ in shapes]
    numels = [math.ceil(math.prod(s) / ZERO_SCALE) for _, s in shapes]
    tensors = []
    for group in ([i for i, (_, s) in enumerate(shapes) if len(s) > 1], None):
        members = group or [i for i, (_, s) in enumerate(shapes) if len(s) <= 1]
        extents, offset = [], 0
        for layer in members:
            extents.append((layer, offset, numels[layer]))
            offset += numels[layer]
        size = math.ceil(offset / world_size)
        pieces = flat_window_pieces(extents, window_start=rank * size, window_numel=size)
        tensors.append((torch.zeros(size), TensorLayout(tuple(members), pieces)))
    return ShardedLayout(names, [(n,) for n in numels], tensors)


def _zero3(shapes, world_size: int, rank: int) -> ShardedLayout:
    """Every parameter split into W slots of ceil(numel / W); one flat tensor of this rank's."""
    names = [n for n, _ in shapes]
    numels = [math.ceil(math.prod(s) / ZERO_SCALE) for _, s in shapes]
    params = [(layer, n, math.ceil(n / world_size)) for layer, n in enumerate(numels)]
    pieces = split_param_pieces(params, rank)
    flat = torch.zeros(sum(slot for _, _, slot in params))
    return ShardedLayout(
        names, [(n,) for n in numels], [(flat, TensorLayout(tuple(range(len(names))), pieces))]
    )


def _fsdp2(shapes, world_size: int, rank: int) -> ShardedLayout:
    """Each parameter a DTensor cut into blocks of ceil(rows / W) rows (one element per row)."""
    names, tensors = [], []
    for layer, (name, shape) in enumerate(shapes):
        rows = shape[0]
        chunk = math.ceil(rows / world_size)
        first = min(rank * chunk, rows)
        count = max(0, min(chunk, rows - first))
        pieces = (Piece(layer, 0, count, first),) if count else ()
        names.append(name)
        tensors.append((torch.zeros(count), TensorLayout((layer,), pieces)))
    return ShardedLayout(names, [(s[0],) for _, s in shapes], tensors)


CASES = ["zero2_resnet50", "zero3_resnet50", "fsdp2_L161", "fsdp2_L1000"]


def cases() -> dict:
    resnet = resnet50_shapes()
    return {
        "zero2_resnet50": (_zero2, resnet),
        "zero3_resnet50": (_zero3, resnet),
        "fsdp2_L161": (_fsdp2, resnet),
        "fsdp2_L1000": (_fsdp2, transformer_shapes()),
    }


def _filled(layout: ShardedLayout) -> SimpleNamespace:
    """Optimizer state whose values tell where they belong: element i of a layer is i."""
    state = {}
    for tensor, entry in layout.items():
        for piece in entry.pieces:
            tensor.narrow(0, piece.start, piece.numel).copy_(
                torch.arange(piece.layer_offset, piece.layer_offset + piece.numel)
            )
        state[tensor] = {"step": 10, "momentum_buffer": tensor.clone()}
    return SimpleNamespace(state=state)


def _check_restored(layout: ShardedLayout, optimizer: SimpleNamespace) -> None:
    for tensor, entry in layout.items():
        for piece in entry.pieces:
            expected = torch.arange(piece.layer_offset, piece.layer_offset + piece.numel).float()
            for values in (tensor, optimizer.state[tensor]["momentum_buffer"]):
                if not torch.equal(values.narrow(0, piece.start, piece.numel), expected):
                    raise AssertionError(
                        f"restored wrong values of {layout.layer_names[piece.layer]}"
                    )
        if optimizer.state[tensor]["step"] != 10:
            raise AssertionError("restored a wrong step counter")


# --- sections ---------------------------------------------------------------------------------
def _run_threads(world_size: int, work) -> list:
    """``work(rank, collectives)`` on ``world_size`` threads; small stacks: 4,096 of them."""
    threading.stack_size(512 * 1024)
    return run_on_threads(world_size, work, timeout_s=600)


def save_run(run: Path, kind, shapes, world_size: int, config: Config, counter: _Counter) -> dict:
    """``KEEP_LAST + 1`` saves by W threads (the first pruned): what rank 0 does to the checkpoint
    directory in the last save, beyond writing its own files."""
    rank0: dict[str, int] = {}

    def rank_main(rank: int, collectives: Collectives) -> None:
        layout = kind(shapes, world_size, rank)
        optimizer = _filled(layout)
        geometry = saved_geometry(layout, owner=True, collectives=collectives)
        payload = {
            "rng": {},
            "task": {},
            "layers": capture_layer_state(optimizer, layout, owner=True),
        }
        for step in range(1, KEEP_LAST + 2):
            counter.reset() if rank == 0 else None
            collectives.barrier()
            save_checkpoint(
                run,
                step,
                rank=rank,
                world_size=world_size,
                rank_payload=payload,
                # model.pt: a placeholder (the model is not built), read by rank 0 at restore.
                shared_payloads={
                    "model.pt": {"placeholder": torch.zeros(1)},
                    "trainer.pt": {},
                    "config.yaml": config.to_yaml(),
                },
                metadata={},
                keep_last=KEEP_LAST,
                collectives=collectives,
                geometry=geometry,
            )
            if rank == 0:
                rank0.update(counter.of())

    _run_threads(world_size, rank_main)
    return {
        "save_rank0_entries_listed": rank0.get("entries_listed", 0),
        "save_rank0_stats": rank0.get("stats", 0),
    }


def startup_checkpoint(run: Path, config: Config, counter: _Counter) -> tuple[dict, object]:
    """``resume: auto`` on the main process and on another rank (which gets the main's answer)."""
    counter.reset()
    info = RunDir(config, is_main=True).resolve_start()
    main = counter.of()
    counter.reset()
    got = RunDir(config, is_main=False).resolve_start(lambda sent: [info])
    other = counter.of()
    assert got is info and info is not None
    return {
        "startup_checkpoint_main_entries_listed": main.get("entries_listed", 0),
        "startup_checkpoint_main_opens": main.get("opens", 0),
        "startup_checkpoint_main_stats": main.get("stats", 0),
        "startup_checkpoint_stats_other_ranks": sum(other.values()),
    }, info


def restore_ranks(info, kind, shapes, new_world: int, counter: _Counter) -> list[dict]:
    """Every rank of a ``new_world``-rank restart, as threads: what each opens and reads
    (``read_for_restore``: at another W the saved files are shared out and the pieces exchanged),
    merged and checked."""

    def rank_main(rank: int, collectives: Collectives) -> dict:
        layout = kind(shapes, new_world, rank)
        inputs = read_for_restore(info, layout, collectives)
        counts = counter.of()  # this thread's: what this rank read (the exchange opens nothing)
        optimizer = SimpleNamespace(state={})
        restore_layer_state(optimizer, layout, (payload for _, payload in inputs.layers))
        _check_restored(layout, optimizer)
        return {
            "rank": rank,
            "rank_files": len(inputs.rank_files),
            "opens": counts.get("opens", 0),
            "stats": counts.get("stats", 0),
            "entries_listed": counts.get("entries_listed", 0),
            "bytes_read": counts.get("bytes_read", 0),
        }

    counter.reset()
    return _run_threads(new_world, rank_main)


def checkpoint_sections(world_sizes: list[int], names: list[str], workdir: Path) -> list[dict]:
    """Every case and world size: start-up, save and restore counts (one row per case and W)."""
    results = []
    with counting() as counter:
        for name, (kind, shapes) in cases().items():
            if name not in names:
                continue
            for world_size in world_sizes:
                run = workdir / f"{name}-{world_size}"
                config = Config.model_validate(
                    {"run": {"output_dir": str(run)}, "checkpoint": {"resume": "auto"}}
                )
                row = {"case": name, "W": world_size}
                row.update(save_run(run, kind, shapes, world_size, config, counter))
                startup, info = startup_checkpoint(run, config, counter)
                row.update(startup)
                same = restore_ranks(info, kind, shapes, world_size, counter)
                row["restore_files_per_rank_same_world"] = max(r["rank_files"] for r in same)
                row["restore_opens_same_world"] = max(r["opens"] for r in same)
                row["restore_bytes_same_world"] = max(r["bytes_read"] for r in same)
                row["restore_stats_entries_same_world"] = max(
                    r["stats"] + r["entries_listed"] for r in same
                )
                for label, new_world in (("3/4", world_size * 3 // 4), ("1/8", world_size // 8)):
                    other = restore_ranks(info, kind, shapes, new_world, counter)
                    excess = math.ceil(world_size / new_world)
                    row[f"restore_files_{label}"] = max(r["rank_files"] for r in other)
                    row[f"restore_excess_{label}"] = max(r["rank_files"] - excess for r in other)
                    row[f"restore_bytes_{label}"] = max(r["bytes_read"] for r in other)
                results.append(row)
                for path in sorted((run / CHECKPOINTS_DIR).glob("step-*")):
                    for file in path.iterdir():
                        file.unlink()
                print(json.dumps(row), flush=True)
    return results


# --- report -----------------------------------------------------------------------------------
def slope(rows: list[dict], key: str, low: int = 512, high: int = 4096) -> float:
    """Worst d ln(count + 1) / d ln W between ``low`` and ``high`` over the cases."""
    worst = 0.0
    by_case = defaultdict(dict)
    for row in rows:
        by_case[row["case"]][row["W"]] = row[key]
    for counts in by_case.values():
        if low in counts and high in counts:
            worst = max(
                worst, math.log((counts[high] + 1) / (counts[low] + 1)) / math.log(high / low)
            )
    return round(worst, 3)


COLUMNS = [
    ("case", "case"),
    ("W", "W"),
    ("startup_checkpoint_main_entries_listed", "start main: listed"),
    ("startup_checkpoint_main_opens", "opens"),
    ("startup_checkpoint_stats_other_ranks", "start other: fs calls"),
    ("save_rank0_entries_listed", "save rank0: listed"),
    ("save_rank0_stats", "stats"),
    ("restore_files_per_rank_same_world", "restore same W: rank files"),
    ("restore_opens_same_world", "opens"),
    ("restore_bytes_same_world", "bytes"),
    ("restore_files_3/4", "3W/4: rank files"),
    ("restore_excess_3/4", "excess"),
    ("restore_files_1/8", "W/8: rank files"),
    ("restore_excess_1/8", "excess"),
    ("restore_bytes_1/8", "bytes"),
]


def report(rows: list[dict]) -> dict:
    widths = [max(len(title), *(len(str(r[k])) for r in rows)) for k, title in COLUMNS]
    print("  ".join(title.rjust(w) for (_, title), w in zip(COLUMNS, widths, strict=True)))
    for row in rows:
        print("  ".join(str(row[k]).rjust(w) for (k, _), w in zip(COLUMNS, widths, strict=True)))
    keys = [k for k, _ in COLUMNS[2:]] + ["restore_stats_entries_same_world"]
    summary = {
        "startup_checkpoint_stats_other_ranks": max(
            r["startup_checkpoint_stats_other_ranks"] for r in rows
        ),
        "restore_files_per_rank_same_world": max(
            r["restore_files_per_rank_same_world"] for r in rows
        ),
        "restore_files_per_rank_other_world_excess": max(
            max(r["restore_excess_3/4"], r["restore_excess_1/8"]) for r in rows
        ),
    }
    summary.update({f"{key}_slope": slope(rows, key) for key in keys})
    return summary


# --- the dataset index and the log step -------------------------------------------------------
def dataset_section(world_sizes: list[int], workdir: Path) -> dict:
    """Directory entries a rank other than the first lists at start-up, per simulated W (its
    start-up holds no loop over ranks: one broadcast, the index memory-mapped, one six-int
    all_reduce)."""
    listing = _load("listing", HERE.parent / "tests" / "distributed" / "listing.py")
    rows = {}
    for world_size in world_sizes:
        directory = workdir / f"index-{world_size}"
        directory.mkdir()
        rows[world_size] = listing.follower_startup_entries(str(directory), IMAGENET_TRAIN)
        print(json.dumps({"section": "dataset", "W": world_size, "entries": rows[world_size]}))
    return rows


def log_step_section(world_sizes: list[int]) -> dict:
    """Bytes rank 0 (which writes the per-layer statistics) and rank W-1 receive at a log step."""
    log_step = _load("log_step_bytes", HERE / "log_step_bytes.py")
    rows = {}
    for num_layers in (161, 1000):
        for world_size in world_sizes:
            rows[num_layers, world_size] = max(
                log_step.log_step_bytes_per_rank(world_size, num_layers, rank=rank)
                for rank in (0, world_size - 1)
            )
    return rows


def _log_slope(counts: dict[int, int], low: int = 512, high: int = 4096) -> float:
    if low not in counts or high not in counts:
        return float("nan")
    return round(math.log((counts[high] + 1) / (counts[low] + 1)) / math.log(high / low), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[8, 64, 512, 4096])
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument(
        "--sections", nargs="+", default=SECTIONS, choices=SECTIONS, help="what to count"
    )
    args = parser.parse_args()
    summary = {}
    with tempfile.TemporaryDirectory(prefix="tvlars-scale-") as workdir:
        if "dataset" in args.sections:
            entries = dataset_section(args.world_sizes, Path(workdir))
            print("\nW     dataset entries listed, a rank other than the first (1,281,167 images)")
            for world_size, count in entries.items():
                print(f"{world_size:<5} {count}")
            summary["startup_dataset_entries_other_ranks"] = max(entries.values())
            summary["startup_dataset_entries_other_ranks_slope"] = _log_slope(entries)
        if "log_step" in args.sections:
            received = log_step_section(args.world_sizes)
            print("\nL     W     bytes a rank receives at a log step (worst of rank 0 and W-1)")
            for (num_layers, world_size), count in received.items():
                print(f"{num_layers:<5} {world_size:<5} {count}")
            summary["log_step_bytes_per_rank"] = max(received.values())
            summary["log_step_bytes_per_rank_slope"] = max(
                _log_slope({w: c for (n, w), c in received.items() if n == layers})
                for layers in (161, 1000)
            )
        if "checkpoint" in args.sections:
            rows = checkpoint_sections(args.world_sizes, args.cases, Path(workdir))
            summary.update(report(rows))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
