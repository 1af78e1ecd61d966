"""Resuming costs every rank the same at any world size, and a damaged file is found.

* only the main process lists the checkpoints and reads a manifest; the others receive its answer;
* a rank reads its own rank file at the same world size, and only the files overlapping its pieces
  at another (ZeRO-like flat windows and FSDP2-like row blocks, emulated on threads);
* a byte flipped inside a tensor's storage, which ``torch.load`` takes silently, is one line naming
  the checkpoint and the file; ``resume: auto`` then continues from the previous checkpoint.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import math
import os
import re
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from torch import nn

from tvlars_scale.checkpoint import CheckpointCorruptError, Checkpointer, find_latest_complete
from tvlars_scale.checkpoint.collectives import run_on_threads
from tvlars_scale.checkpoint.directory import load_file, rank_file, read_manifest, save_checkpoint
from tvlars_scale.checkpoint.geometry import rank_files_to_read, saved_geometry
from tvlars_scale.checkpoint.layer_state import (
    capture_layer_state,
    restore_layer_state,
    unsharded_layout,
)
from tvlars_scale.checkpoint.reading import read_for_restore
from tvlars_scale.config import Config, ConfigError
from tvlars_scale.optim import TVLARS, Piece, ShardedLayout, TensorLayout, layerwise_param_groups
from tvlars_scale.optim.zero_layout import flat_window_pieces
from tvlars_scale.run_dir import RunDir


@contextlib.contextmanager
def _file_system_calls(monkeypatch):
    """Paths this process opens, stats and lists inside the block, by kind."""
    calls: dict[str, list[str]] = {"open": [], "stat": [], "list": []}

    def counting(kind, original):
        def call(path, *args, **kwargs):
            calls[kind].append(os.fspath(path) if not isinstance(path, int) else str(path))
            return original(path, *args, **kwargs)

        return call

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", counting("open", builtins.open))
        patch.setattr(io, "open", counting("open", io.open))
        patch.setattr(os, "stat", counting("stat", os.stat))
        patch.setattr(os, "scandir", counting("list", os.scandir))
        patch.setattr(os, "listdir", counting("list", os.listdir))
        yield calls


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))  # 24 + 6 + 18 + 3 elements
    optimizer = TVLARS(layerwise_param_groups(model, 5e-4), lr=2.0, eta=0.01, lmbda=0.1)
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(3):
        optimizer.zero_grad()
        x, y = torch.randn(8, 4, generator=generator), torch.randn(8, 3, generator=generator)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return model, optimizer


def _config(run: Path, optim: dict | None = None, **checkpoint) -> Config:
    return Config.model_validate(
        {"run": {"output_dir": str(run)}, "checkpoint": checkpoint, "optim": optim or {}}
    )


# --- resolving: the main process alone ------------------------------------------------------------
def test_only_the_main_process_looks_for_the_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    config = _config(run, resume="auto")
    for step in (4, 8):  # a 16-rank checkpoint: 16 rank files nobody needs to look at
        run_on_threads(
            16,
            lambda rank, collectives, step=step: save_checkpoint(
                run,
                step,
                rank=rank,
                world_size=16,
                rank_payload={},
                shared_payloads={"config.yaml": config.to_yaml()},
                metadata={},
                keep_last=5,
                collectives=collectives,
            ),
        )
    with _file_system_calls(monkeypatch) as calls:
        info = RunDir(config, is_main=True).resolve_start()
    assert info.step == 8 and info.world_size == 16
    touched = calls["open"] + calls["stat"] + calls["list"]
    assert not [path for path in touched if re.search(r"rank-\d+\.pt$", path)]
    assert len(calls["list"]) == 1  # the checkpoints directory, once
    assert len(calls["open"]) == 2  # step-8's manifest and config.yaml

    sent = []
    with _file_system_calls(monkeypatch) as calls:
        got = RunDir(config, is_main=False).resolve_start(lambda box: sent.append(box) or [info])
    assert got == info and sent == [[None]]
    assert calls == {"open": [], "stat": [], "list": []}  # nothing listed, stat'ed or opened

    # The main process's refusal is raised on every rank, from what it sent.
    refusal = _config(run, optim={"lr": 9.0}, resume="auto")
    with pytest.raises(ConfigError) as main_error:
        RunDir(refusal, is_main=True).resolve_start()
    sent_refusal = (main_error.value.key, main_error.value.problem)
    with pytest.raises(ConfigError) as other_error:
        RunDir(refusal, is_main=False).resolve_start(lambda box: [sent_refusal])
    assert other_error.value.line() == main_error.value.line()


# --- restoring: the files a rank needs ------------------------------------------------------------
def _flat(model: nn.Module, world_size: int, rank: int) -> ShardedLayout:
    """ZeRO-1/2 as zero_layout builds it: every parameter in one flat buffer cut into equal
    windows (the tail padded)."""
    params = list(model.named_parameters())
    extents, offset = [], 0
    for layer, (_, p) in enumerate(params):
        extents.append((layer, offset, p.numel()))
        offset += p.numel()
    size = math.ceil(offset / world_size)
    pieces = flat_window_pieces(extents, window_start=rank * size, window_numel=size)
    names, shapes = [n for n, _ in params], [tuple(p.shape) for _, p in params]
    entry = TensorLayout(tuple(range(len(params))), pieces)
    return ShardedLayout(names, shapes, [(torch.zeros(size), entry)])


def _rows(model: nn.Module, world_size: int, rank: int) -> ShardedLayout:
    """FSDP2 as fsdp_layout builds it: each parameter a block of ``ceil(rows / W)`` rows."""
    names, shapes, tensors = [], [], []
    for layer, (name, p) in enumerate(model.named_parameters()):
        rows, row_numel = p.shape[0], p[0].numel()
        chunk = math.ceil(rows / world_size)
        first = min(rank * chunk, rows)
        count = max(0, min(chunk, rows - first))
        pieces = (Piece(layer, 0, count * row_numel, first * row_numel),) if count else ()
        names.append(name)
        shapes.append(tuple(p.shape))
        tensors.append((torch.zeros(count * row_numel), TensorLayout((layer,), pieces)))
    return ShardedLayout(names, shapes, tensors)


def _elements(layout: ShardedLayout) -> set[tuple[str, int]]:
    return {
        (layout.layer_names[piece.layer], piece.layer_offset + i)
        for _, entry in layout.items()
        for piece in entry.pieces
        for i in range(piece.numel)
    }


def _save_sharded(path: Path, model: nn.Module, unsharded: list, kind, world_size: int) -> list:
    """``unsharded`` (one process's saved layers) cut by ``kind`` and saved by ``world_size``
    threads as one checkpoint, with its geometry; the saving ranks' layouts."""

    def save(rank: int, collectives) -> ShardedLayout:
        layout = kind(model, world_size, rank)
        sharded = SimpleNamespace(state={})
        restore_layer_state(sharded, layout, unsharded)
        save_checkpoint(
            path,
            1,
            rank=rank,
            world_size=world_size,
            rank_payload={"layers": capture_layer_state(sharded, layout, owner=True)},
            shared_payloads={"trainer.pt": {}, "model.pt": {}},
            metadata={},
            keep_last=1,
            collectives=collectives,
            geometry=saved_geometry(layout, owner=True, collectives=collectives),
        )
        return layout

    return run_on_threads(world_size, save)


def _assert_restored(restored, layout: ShardedLayout, unsharded: list, reference=None) -> None:
    """``restored`` (into ``layout``) equals ``unsharded`` restored into ``reference`` (default:
    ``layout`` itself), weights and optimizer state, bitwise."""
    reference = reference or layout
    expected = SimpleNamespace(state={})
    restore_layer_state(expected, reference, unsharded)
    for (tensor, _), (ref, _) in zip(layout.items(), reference.items(), strict=True):
        assert torch.equal(tensor, ref)
        state, reference_state = restored.state.get(tensor), expected.state.get(ref)
        assert (state is None) == (reference_state is None)
        for key, value in (reference_state or {}).items():
            same = torch.equal(state[key], value) if torch.is_tensor(value) else None
            assert same if same is not None else state[key] == value, key


@pytest.mark.parametrize("kind", [_flat, _rows])
def test_a_rank_reads_its_own_file_or_only_the_overlapping_ones(tmp_path, kind):
    model, optimizer = _model_and_optimizer()
    unsharded = [capture_layer_state(optimizer, unsharded_layout(model, optimizer), owner=True)]
    saved_world = 4
    saved_layouts = _save_sharded(tmp_path, model, unsharded, kind, saved_world)
    info = find_latest_complete(tmp_path)
    assert info.geometry is not None
    for rank in range(saved_world):  # same world size: its own file (none if it holds nothing)
        files = rank_files_to_read(info.geometry, kind(model, saved_world, rank), saved_world)
        assert files == ([rank] if _elements(saved_layouts[rank]) else [])
    for world_size in (3, 1):
        for rank in range(world_size):
            layout = kind(model, world_size, rank)
            needed = _elements(layout)
            overlapping = [s for s, old in enumerate(saved_layouts) if _elements(old) & needed]
            files = rank_files_to_read(info.geometry, layout, saved_world)
            assert files == overlapping, (world_size, rank)
            restored = SimpleNamespace(state={})
            restore_layer_state(
                restored, layout, (load_file(info.path, rank_file(s))["layers"] for s in files)
            )
            _assert_restored(restored, layout, unsharded)


def _whole(model: nn.Module, world_size: int, rank: int) -> ShardedLayout:
    """One process / DDP: every rank steps every parameter whole (fresh zeros, to be restored)."""
    return ShardedLayout.whole_layers(
        [(name, torch.zeros_like(p)) for name, p in model.named_parameters()]
    )


@pytest.mark.parametrize("saved_kind", [_flat, _rows])
@pytest.mark.parametrize("kind", [_flat, _rows, _whole])
def test_at_another_world_size_each_saved_file_is_read_by_one_rank(
    tmp_path, monkeypatch, saved_kind, kind
):
    """Another world size (or engine): saved file ``s`` is opened by rank ``s mod W`` alone and the
    pieces reach their ranks by the all-to-all; what each rank restores equals the unsharded
    reference (weights and optimizer state, bitwise)."""
    model, optimizer = _model_and_optimizer()
    unsharded = [capture_layer_state(optimizer, unsharded_layout(model, optimizer), owner=True)]
    saved_world = 4
    _save_sharded(tmp_path, model, unsharded, saved_kind, saved_world)
    info = find_latest_complete(tmp_path)
    opened: list[tuple[int, str]] = []
    original = builtins.open

    def counting(file, *args, **kwargs):
        if re.search(r"rank-\d+\.pt$", str(file)):
            opened.append((threading.get_ident(), Path(file).name))
        return original(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting)
    for world_size in (3, 2, 6, 1) + ((4,) if kind is not saved_kind else ()):
        opened.clear()

        def restore(rank: int, collectives, world_size=world_size):
            layout = kind(model, world_size, rank)
            inputs = read_for_restore(info, layout, collectives)
            restored = SimpleNamespace(state={})
            restore_layer_state(restored, layout, (payload for _, payload in inputs.layers))
            return threading.get_ident(), layout, restored

        for thread, layout, restored in run_on_threads(world_size, restore):
            mine = [name for ident, name in opened if ident == thread]
            assert len(mine) <= math.ceil(saved_world / world_size), (world_size, mine)
            # Whole layers restore into fresh zeros: the reference gets tensors of its own.
            reference = kind(model, world_size, 0) if kind is _whole else None
            _assert_restored(restored, layout, unsharded, reference)
        names = sorted(name for _, name in opened)
        assert names == [rank_file(s) for s in range(saved_world)]  # each file once, in all


def test_runs_the_rule_cannot_place_leave_no_geometry(tmp_path):
    """Saving ranks not in shard order (rank 1 holds the first window): every file is read."""
    model, _ = _model_and_optimizer()

    def geometry(rank: int, collectives):
        return saved_geometry(_flat(model, 2, 1 - rank), owner=True, collectives=collectives)

    assert run_on_threads(2, geometry) == [None, None]
    assert rank_files_to_read(None, _flat(model, 2, 0), 5) == [0, 1, 2, 3, 4]


# --- integrity ------------------------------------------------------------------------------------
def _checkpointer(model, optimizer, run: Path, config: Config) -> Checkpointer:
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.NO,
        unwrap_model=lambda wrapped: wrapped,
        process_index=0,
        num_processes=1,
        is_main_process=True,
        device=torch.device("cpu"),
    )
    task = SimpleNamespace(state_dict=dict, load_state_dict=lambda state: None)
    position = {"state": {"epoch": 0, "num_samples": 0}}

    def state_dict():
        position["state"] = {**position["state"], "num_samples": position["state"]["num_samples"]}
        return position

    train_state = SimpleNamespace(state_dict=state_dict, load_state_dict=lambda state: None)
    return Checkpointer(
        accelerator,
        model,
        optimizer,
        task,
        run,
        keep_last=5,
        config_yaml=config.to_yaml(),
        train_state=train_state,
    )


def _flip_a_byte_inside(path: Path, tensor: torch.Tensor) -> None:
    data = bytearray(path.read_bytes())
    at = bytes(data).find(tensor.numpy().tobytes())
    assert at > 0
    data[at + 1] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_one_line_and_auto_resume_takes_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    config = _config(run, resume="auto")
    model, optimizer = _model_and_optimizer()
    checkpointer = _checkpointer(model, optimizer, run, config)
    checkpointer.save(1)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.data.add_(1.0)
    checkpointer.train_state.state_dict()["state"]["num_samples"] = 8  # a new position
    newest = checkpointer.save(2)

    saved = load_file(newest, rank_file(0))
    weights = saved["layers"]["runs"][0]["weights"]
    _flip_a_byte_inside(newest / rank_file(0), weights)
    # torch.load takes the damaged file without a word: only the checksum sees it.
    assert not torch.equal(load_file(newest, rank_file(0))["layers"]["runs"][0]["weights"], weights)

    fresh, fresh_optimizer = _model_and_optimizer(seed=5)
    restoring = _checkpointer(fresh, fresh_optimizer, run, config)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointCorruptError) as raised:
        restoring.restore(read_manifest(newest), print)
    line = raised.value.line()
    assert "\n" not in line and str(newest) in line and f"{rank_file(0)} is corrupt" in line
    for key, value in fresh.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key]), key

    printed = []
    run_dir = RunDir(config, is_main=True)
    assert run_dir.restore(restoring, run_dir.resolve_start(), printed.append).step == 1
    assert len(printed) == 1 and f"{rank_file(0)} is corrupt" in printed[0]
    assert "previous complete checkpoint" in printed[0] and "step-1" in printed[0]
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, first[key]), key

    # Named explicitly, the corrupt checkpoint is refused, not replaced.
    explicit = RunDir(_config(run, resume=str(newest)), is_main=True)
    with pytest.raises(CheckpointCorruptError):
        explicit.restore(restoring, explicit.resolve_start(), printed.append)
    counts = Counter(p.name for p in newest.iterdir())
    assert counts[rank_file(0)] == 1  # the damaged file is left for inspection
