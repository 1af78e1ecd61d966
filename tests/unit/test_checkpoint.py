"""Checkpoint parts that need no trainer: atomic directories, keep-last-K, per-layer optimizer state
at another sharding, RNG round trips, the resume policy (config changes, run directories), the
pre-emption flag and the finite-gradient check."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.utils import DistributedType
from torch import nn

from tvlars_scale.checkpoint import Checkpointer, directory, policy
from tvlars_scale.checkpoint.collectives import run_on_threads
from tvlars_scale.checkpoint.directory import (
    CHECKPOINTS_DIR,
    MANIFEST,
    RANK_TABLE,
    complete_checkpoints,
    find_latest_complete,
    prune,
    rank_file,
    read_manifest,
    remove_leftovers,
    save_checkpoint,
)
from tvlars_scale.checkpoint.layer_state import (
    capture_layer_state,
    restore_layer_state,
    unsharded_layout,
)
from tvlars_scale.checkpoint.rng import capture_rng_state, restore_rng_state
from tvlars_scale.config import Config, ConfigError
from tvlars_scale.nonfinite import gradients_are_finite
from tvlars_scale.optim import TVLARS, ShardedLayout, TensorLayout, layerwise_param_groups
from tvlars_scale.optim.zero_layout import flat_window_pieces
from tvlars_scale.preemption import PreemptionFlag
from tvlars_scale.train_state import TrainState

REPO = Path(__file__).resolve().parents[2]


def _save(run_dir: Path, step: int, world_size: int = 1, keep_last: int = 10, **metadata) -> Path:
    """Save ``step`` as the ranks of a ``world_size`` run would: one thread per rank, real barriers."""
    paths = run_on_threads(
        world_size,
        lambda rank, collectives: save_checkpoint(
            run_dir,
            step,
            rank=rank,
            world_size=world_size,
            rank_payload={"rank": rank, "values": torch.arange(4) + rank},
            shared_payloads={"shared.pt": {"step": step}, "config.yaml": "a: 1\n"},
            metadata={"step": step, **metadata},
            keep_last=keep_last,
            collectives=collectives,
        ),
    )
    assert len(set(paths)) == 1
    return paths[0]


def _steps(run_dir: Path) -> list[int]:
    return [info.step for info in complete_checkpoints(run_dir / CHECKPOINTS_DIR)]


# --- atomic directories ---------------------------------------------------------------------------
def test_save_publishes_a_complete_directory_and_latest(tmp_path):
    path = _save(tmp_path, 3, world_size=2, note="x")
    assert path == tmp_path / CHECKPOINTS_DIR / "step-3"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [MANIFEST, RANK_TABLE, rank_file(0), rank_file(1), "shared.pt", "config.yaml"]
    )
    info = read_manifest(path)
    assert (info.step, info.world_size, info.metadata) == (3, 2, {"step": 3, "note": "x"})
    assert (tmp_path / CHECKPOINTS_DIR / "latest").read_text() == "step-3\n"
    assert directory.load_file(path, rank_file(1))["rank"] == 1
    assert directory.load_file(path, "config.yaml") == "a: 1\n"
    assert not [p for p in (tmp_path / CHECKPOINTS_DIR).iterdir() if p.name.startswith(".")]


def test_rank_zero_refuses_to_publish_without_every_rank_file(tmp_path):
    with pytest.raises(RuntimeError, match=r"rank-00001\.pt missing"):
        save_checkpoint(
            tmp_path,
            5,
            rank=0,
            world_size=2,
            rank_payload={},
            shared_payloads={},
            metadata={},
            keep_last=3,
        )
    assert find_latest_complete(tmp_path) is None
    assert (tmp_path / CHECKPOINTS_DIR / ".tmp-step-5").is_dir()


def test_torn_and_temporary_directories_are_ignored(tmp_path):
    _save(tmp_path, 2, world_size=2)
    root = tmp_path / CHECKPOINTS_DIR
    good = root / "step-2"

    def torn_copy(step: int, damage) -> None:
        copy = root / f"step-{step}"
        copy.mkdir()
        for file in good.iterdir():
            (copy / file.name).write_bytes(file.read_bytes())
        manifest = json.loads((copy / MANIFEST).read_text())
        manifest["step"] = step
        (copy / MANIFEST).write_text(json.dumps(manifest))
        damage(copy)

    torn_copy(3, lambda d: (d / MANIFEST).unlink())  # crashed before the manifest
    torn_copy(6, lambda d: (d / MANIFEST).write_text("{not json"))
    torn_copy(
        7,
        lambda d: (d / MANIFEST).write_text(
            json.dumps({**json.loads((good / MANIFEST).read_text()), "step": 5})
        ),
    )  # a manifest of another step
    (root / ".tmp-step-8").mkdir()
    (root / ".tmp-step-8" / rank_file(0)).write_bytes(b"partial")
    (root / "latest").write_text("step-8\n")  # a pointer to a torn checkpoint is never trusted

    assert _steps(tmp_path) == [2]
    assert find_latest_complete(tmp_path).path == good
    assert read_manifest(root / ".tmp-step-8") is None


def test_keep_last_prunes_only_complete_checkpoints(tmp_path):
    root = tmp_path / CHECKPOINTS_DIR
    root.mkdir()
    (root / "step-1").mkdir()  # torn, older than every complete one: not counted, not deleted
    (root / ".tmp-step-99").mkdir()
    for step in (2, 4, 6, 8, 10):
        _save(tmp_path, step, keep_last=2)
    assert _steps(tmp_path) == [8, 10]
    assert (root / "step-1").is_dir() and (root / ".tmp-step-99").is_dir()
    assert sorted(p.name for p in remove_leftovers(root)) == [".tmp-step-99"]
    prune(root, 1)
    assert _steps(tmp_path) == [10]


def test_saving_a_step_again_replaces_it(tmp_path):
    _save(tmp_path, 4, world_size=1)
    path = save_checkpoint(
        tmp_path,
        4,
        rank=0,
        world_size=1,
        rank_payload={"rank": 0, "values": torch.full((4,), 7)},
        shared_payloads={},
        metadata={"second": True},
        keep_last=3,
    )
    assert read_manifest(path).metadata == {"second": True}
    assert torch.equal(directory.load_file(path, rank_file(0))["values"], torch.full((4,), 7))
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS_DIR).iterdir()) == ["latest", "step-4"]


def test_sigkill_inside_the_save_leaves_the_previous_checkpoint_as_latest(tmp_path):
    _save(tmp_path, 1)
    script = textwrap.dedent(
        f"""
        import torch
        from tvlars_scale.checkpoint.directory import save_checkpoint
        save_checkpoint({str(tmp_path)!r}, 2, rank=0, world_size=1, rank_payload={{"x": torch.ones(3)}},
                        shared_payloads={{}}, metadata={{}}, keep_last=1)
        """
    )
    env = {**os.environ, "TVLARS_FAULT_KILL": "in_save:2"}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, timeout=120)
    assert result.returncode == -signal.SIGKILL
    root = tmp_path / CHECKPOINTS_DIR
    assert (root / ".tmp-step-2" / rank_file(0)).is_file()  # the rank files were written...
    assert find_latest_complete(tmp_path).step == 1  # ...but never published
    assert (root / "latest").read_text() == "step-1\n"


# --- per-layer optimizer state --------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 3)  # weight 12 elements (adapted), bias 3 (excluded)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _train(model: nn.Module, optimizer, num_steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(num_steps):
        x = torch.randn(8, 4, generator=generator)
        y = torch.randn(8, 2, generator=generator)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = _Tiny()
    optimizer = TVLARS(layerwise_param_groups(model, 5e-4), lr=2.0, eta=0.01, lmbda=0.1)
    return model, optimizer


def _flat_layout(
    model: nn.Module, cuts: list[int], rank: int
) -> tuple[ShardedLayout, torch.Tensor]:
    """Emulate ZeRO-1/2: every parameter in ONE flat buffer (padded), rank ``rank`` holds the window
    ``cuts[rank]:cuts[rank + 1]``; returns its layout, built as zero_layout builds it, and its
    (zero-initialised) partition."""
    params = list(model.named_parameters())
    extents, offset = [], 0
    for layer, (_, p) in enumerate(params):
        extents.append((layer, offset, p.numel()))
        offset += p.numel()
    first, last = cuts[rank], cuts[rank + 1]
    partition = torch.zeros(last - first)
    pieces = flat_window_pieces(extents, window_start=first, window_numel=last - first)
    entry = TensorLayout(tuple(range(len(params))), pieces)
    names, shapes = [name for name, _ in params], [tuple(p.shape) for _, p in params]
    return ShardedLayout(names, shapes, [(partition, entry)]), partition


def test_unsharded_round_trip_continues_bitwise(tmp_path):
    model, optimizer = _model_and_optimizer()
    _train(model, optimizer, 3, seed=1)
    payload = capture_layer_state(optimizer, unsharded_layout(model, optimizer), owner=True)
    torch.save(payload, tmp_path / "state.pt")

    resumed, resumed_optimizer = _model_and_optimizer(seed=123)  # other initial weights
    restore_layer_state(
        resumed_optimizer,
        unsharded_layout(resumed, resumed_optimizer),
        [torch.load(tmp_path / "state.pt", weights_only=True, mmap=True)],
    )
    for p, q in zip(optimizer.state.values(), resumed_optimizer.state.values(), strict=True):
        assert p["step"] == q["step"] == 3
    _train(model, optimizer, 2, seed=2)
    _train(resumed, resumed_optimizer, 2, seed=2)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_non_owner_rank_writes_nothing():
    model, optimizer = _model_and_optimizer()
    _train(model, optimizer, 1, seed=1)
    payload = capture_layer_state(optimizer, unsharded_layout(model, optimizer), owner=False)
    assert payload == {"shapes": {}, "scalars": {}, "state_keys": {}, "runs": []}


def test_unsharded_layout_is_the_stepped_parameters_as_whole_layers():
    model, optimizer = _model_and_optimizer()
    layout = unsharded_layout(model, optimizer)
    assert not layout.sharded
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    names = {id(p): name for name, p in model.named_parameters()}
    assert layout.layer_names == tuple(names[id(p)] for p in stepped)
    assert layout.layer_shapes == tuple(tuple(p.shape) for p in stepped)
    for layer, (tensor, entry) in enumerate(layout.items()):
        assert tensor is stepped[layer] and entry is layout.of(tensor)
        assert entry.layers == (layer,)
        (piece,) = entry.pieces
        assert (piece.layer, piece.start, piece.numel, piece.layer_offset) == (
            layer,
            0,
            tensor.numel(),
            0,
        )
    with pytest.raises(ValueError, match="not a parameter of the model"):
        unsharded_layout(nn.Linear(4, 3), optimizer)


@pytest.mark.parametrize("cuts", [[0, 9, 36], [0, 13, 26, 36]])
def test_state_moves_between_unsharded_and_flat_partitions(cuts):
    """1 process -> N emulated ZeRO ranks (layers cut mid-way) -> 1 process, nothing lost."""
    model, optimizer = _model_and_optimizer()
    _train(model, optimizer, 3, seed=1)
    unsharded = [capture_layer_state(optimizer, unsharded_layout(model, optimizer), owner=True)]

    sharded_payloads = []
    for rank in range(len(cuts) - 1):
        layout, partition = _flat_layout(model, cuts, rank)
        flat_optimizer = SimpleNamespace(state={})
        restore_layer_state(flat_optimizer, layout, unsharded)
        # The partition holds this window of the concatenated master weights, padding zero.
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        flat = torch.cat([flat, flat.new_zeros(cuts[-1] - flat.numel())])
        assert torch.equal(partition, flat[cuts[rank] : cuts[rank + 1]])
        assert flat_optimizer.state[partition]["step"] == 3
        sharded_payloads.append(capture_layer_state(flat_optimizer, layout, owner=True))

    back, back_optimizer = _model_and_optimizer(seed=7)
    restore_layer_state(back_optimizer, unsharded_layout(back, back_optimizer), sharded_payloads)
    for (name, p), q in zip(model.named_parameters(), back.parameters(), strict=True):
        assert torch.equal(p, q), name
        assert torch.equal(
            optimizer.state[p]["momentum_buffer"], back_optimizer.state[q]["momentum_buffer"]
        )
        assert back_optimizer.state[q]["step"] == 3


def test_restore_names_what_cannot_be_restored():
    model, optimizer = _model_and_optimizer()
    _train(model, optimizer, 2, seed=1)
    layout = unsharded_layout(model, optimizer)
    payload = capture_layer_state(optimizer, layout, owner=True)

    missing_run = {**payload, "runs": [r for r in payload["runs"] if r["layer"] != "fc2.weight"]}
    with pytest.raises(ValueError, match=r"holds 0 of the 6 elements of fc2\.weight"):
        restore_layer_state(optimizer, layout, [missing_run])

    fc1_weight = next(r for r in payload["runs"] if r["layer"] == "fc1.weight")
    half = {**fc1_weight, "numel": 6, "weights": fc1_weight["weights"][:6]}
    gap = {**payload, "runs": [r if r is not fc1_weight else half for r in payload["runs"]]}
    with pytest.raises(ValueError, match=r"holds 6 of the 12 elements of fc1\.weight"):
        restore_layer_state(optimizer, layout, [gap])

    other = nn.Linear(4, 5)
    other_optimizer = TVLARS(other.parameters(), lr=1.0)
    with pytest.raises(ValueError, match=r"checkpoint has no weights for parameter bias"):
        restore_layer_state(other_optimizer, unsharded_layout(other, other_optimizer), [payload])

    # fc1.weight and fc2.weight in one emulated partition, saved with different step counters.
    scalars = {**payload["scalars"], "fc2.weight": {"step": 1}}
    flat_layout, _ = _flat_layout(model, [0, 36], 0)
    with pytest.raises(ValueError, match="different per-tensor optimizer state"):
        restore_layer_state(
            SimpleNamespace(state={}), flat_layout, [{**payload, "scalars": scalars}]
        )


def _checkpointer(model, optimizer, distributed_type, process_index: int = 0) -> Checkpointer:
    """A Checkpointer over an Accelerator reduced to what its constructor reads."""
    accelerator = SimpleNamespace(
        distributed_type=distributed_type,
        unwrap_model=lambda wrapped: getattr(wrapped, "module", wrapped),
        process_index=process_index,
    )
    return Checkpointer(accelerator, model, optimizer, None, ".", keep_last=1)


def test_checkpointer_saves_whole_layers_when_nothing_is_sharded():
    model, optimizer = _model_and_optimizer()
    assert optimizer.layout is None
    layout = _checkpointer(model, optimizer, DistributedType.MULTI_GPU, process_index=1).layout
    assert not layout.sharded
    assert layout.layer_names == unsharded_layout(model, optimizer).layer_names
    with pytest.raises(ValueError, match="unsharded"):
        optimizer.bind_layout(layout)  # whole layers' norms are local: nothing to bind


def test_checkpointer_takes_the_layout_the_optimizer_is_bound_to(monkeypatch):
    from tvlars_scale.optim import zero_layout

    model, optimizer = _model_and_optimizer()
    partition = torch.zeros(36)
    bound, _ = _flat_layout(model, [0, 36], 0)
    optimizer.bind_layout(bound)
    built = []

    def build(zero_optimizer):
        built.append(zero_optimizer)
        return _flat_layout(model, [0, 36], 0)[0]

    zero = SimpleNamespace(optimizer=optimizer)  # a ZeRO optimizer wrapping the client
    monkeypatch.setattr(zero_layout, "find_zero_optimizer", lambda engine: zero)
    monkeypatch.setattr(zero_layout, "zero_layout", build)
    engine = SimpleNamespace(module=model)
    checkpointer = _checkpointer(engine, optimizer, DistributedType.DEEPSPEED)
    assert optimizer.layout is bound
    assert checkpointer.layout is bound
    assert built == []  # nothing derived a second description

    # An element-wise client (torch SGD) is not bound: the layout is built from the ZeRO optimizer.
    zero.optimizer = torch.optim.SGD([partition], lr=0.1)
    checkpointer = _checkpointer(engine, zero.optimizer, DistributedType.DEEPSPEED)
    assert built == [zero] and checkpointer.layout.sharded


# --- random states --------------------------------------------------------------------------------
def _draw() -> tuple:
    return (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())


def test_rng_round_trip_is_exact(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = _draw()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draw() == expected


def test_rng_restore_fails_loudly():
    state = capture_rng_state()
    del state["numpy"]
    with pytest.raises(ValueError, match="lacks numpy"):
        restore_rng_state(state)
    state = capture_rng_state()
    state["cuda"] = None if torch.cuda.is_available() else torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="cannot continue exactly"):
        restore_rng_state(state)


# --- resume policy ---------------------------------------------------------------------------------
def _config(**overrides) -> dict:
    raw = Config().model_dump(mode="json")
    for key, value in overrides.items():
        section, name = key.split("__")
        raw[section][name] = value
    return raw


def test_meaningful_changes_are_refused_unless_allowed():
    saved = _config()
    for key, value in [
        ("batch__global_batch_size", 1024),
        ("optim__name", "lamb"),
        ("optim__lr", 2.0),
        ("model__name", "resnet34"),
        ("data__name", "cifar10"),
        ("run__seed", 1),
        ("run__num_epochs", 40),
    ]:
        dotted = key.replace("__", ".")
        with pytest.raises(ConfigError) as raised:
            policy.check_allowed_changes(saved, _config(**{key: value}), [], "checkpoint step-4")
        assert raised.value.key == dotted
        assert "checkpoint.allow_changes" in raised.value.problem
        assert repr(value) in raised.value.problem
        policy.check_allowed_changes(saved, _config(**{key: value}), [dotted], "checkpoint step-4")


def test_operational_changes_are_accepted():
    changed = _config(
        run__output_dir="elsewhere",
        run__log_every=1,
        run__trackers=["wandb", "mlflow"],
        batch__micro_batch_size=8,
        data__path="/data/cifar",
    )
    changed["checkpoint"] = {"every_steps": 7, "resume": "auto"}
    assert policy.config_changes(_config(), changed) == []
    older = _config()  # a checkpoint written before run.trackers replaced run.tensorboard
    del older["run"]["trackers"]
    older["run"]["tensorboard"] = True
    assert policy.config_changes(older, _config()) == []


def _run_with_checkpoint(run_dir: Path, step: int, config: dict) -> None:
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    save_checkpoint(
        run_dir,
        step,
        rank=0,
        world_size=1,
        rank_payload={},
        shared_payloads={"config.yaml": yaml.safe_dump(config)},
        metadata={},
        keep_last=5,
    )


RUN_FILES = ("config.yaml", "metrics.json", CHECKPOINTS_DIR)


def _resolve(resume, run_dir, config=None, allowed=(), overwrite=False):
    return policy.resolve_resume(
        resume, run_dir, config or _config(), allowed, overwrite, RUN_FILES
    )


def test_resume_resolution(tmp_path):
    run = tmp_path / "run"
    assert _resolve(None, run) is None  # new directory
    assert _resolve("auto", run) is None  # nothing to resume: a new run
    _run_with_checkpoint(run, 4, _config())
    _run_with_checkpoint(run, 8, _config())
    (run / CHECKPOINTS_DIR / ".tmp-step-12").mkdir()  # torn
    assert _resolve("auto", run).step == 8
    assert _resolve(str(run), tmp_path / "fork").step == 8  # a run directory: its newest
    assert _resolve(str(run / CHECKPOINTS_DIR / "step-4"), tmp_path / "fork").step == 4
    assert _resolve(str(run / CHECKPOINTS_DIR / "step-4"), run, overwrite=True).step == 4


@pytest.mark.parametrize(
    ("case", "key", "fragment"),
    [
        ("existing run, no resume", "run.output_dir", "already holds a run"),
        ("path does not exist", "checkpoint.resume", "does not exist"),
        ("torn checkpoint", "checkpoint.resume", "not a complete checkpoint"),
        ("older than newest", "checkpoint.resume", "would fork the run"),
        ("other run's directory", "run.output_dir", "already holds another run"),
        ("config changed", "optim.lr", "changes what the run means"),
        ("auto over another run without checkpoint", "optim.lr", "changes what the run means"),
    ],
)
def test_resume_refusals(tmp_path, case, key, fragment):
    run, other = tmp_path / "run", tmp_path / "other"
    _run_with_checkpoint(run, 4, _config())
    _run_with_checkpoint(run, 8, _config())
    (run / CHECKPOINTS_DIR / ".tmp-step-12").mkdir()
    arguments = {
        "existing run, no resume": (None, run),
        "path does not exist": (str(tmp_path / "nope"), run),
        "torn checkpoint": (str(run / CHECKPOINTS_DIR / ".tmp-step-12"), tmp_path / "new"),
        "older than newest": (str(run / CHECKPOINTS_DIR / "step-4"), run),
        "other run's directory": (str(run), other),
        "config changed": ("auto", run),
        "auto over another run without checkpoint": ("auto", other),
    }[case]
    other.mkdir()
    (other / "config.yaml").write_text(json.dumps(_config(optim__lr=0.5)))
    config = _config(optim__lr=3.0) if "config" in case or "auto" in case else None
    with pytest.raises(ConfigError) as raised:
        _resolve(*arguments, config=config)
    assert raised.value.key == key
    assert fragment in raised.value.problem


# --- pre-emption signals and non-finite gradients --------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_sets_the_flag_and_handlers_are_restored(signum):
    previous = signal.getsignal(signum)
    flag = PreemptionFlag()
    flag.install()
    try:
        assert not flag.requested(torch.device("cpu"))
        os.kill(os.getpid(), signum)  # the process survives: the handler only records it
        assert flag.requested(torch.device("cpu"))
        assert flag.describe() == signal.Signals(signum).name
    finally:
        flag.uninstall()
    assert signal.getsignal(signum) is previous


def test_gradients_are_finite():
    params = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    assert gradients_are_finite(params)  # no gradients yet
    params[0].grad = torch.ones(3)
    assert gradients_are_finite(params)
    for bad in (float("nan"), float("inf"), -float("inf")):
        params[1].grad = torch.tensor([0.0, bad])
        assert not gradients_are_finite(params)


def test_each_rank_gets_its_own_buffers_back_and_old_checkpoints_still_load(tmp_path):
    """Under DeepSpeed and FSDP2 each rank's BatchNorm statistics are its own; model.pt holds the main
    process's. A rank restores the statistics of its rank file; a checkpoint without them (written
    before they were saved) restores model.pt's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = TVLARS(layerwise_param_groups(model, 5e-4), lr=1.0)
    model(torch.randn(8, 4))  # the running statistics move away from their initial values
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.NO,
        unwrap_model=lambda wrapped: wrapped,
        process_index=0,
        num_processes=1,
        is_main_process=True,
        device=torch.device("cpu"),
    )
    task = SimpleNamespace(state_dict=dict, load_state_dict=lambda state: None)
    position = {"state": {"epoch": 0, "num_samples": 8}}
    train_state = SimpleNamespace(state_dict=lambda: position, load_state_dict=lambda state: None)
    checkpointer = Checkpointer(
        accelerator, model, optimizer, task, tmp_path, keep_last=2, train_state=train_state
    )
    info = directory.read_manifest(checkpointer.save(1))
    own = model[1].running_mean.clone()

    # model.pt as another rank (the main process) saw it: other statistics.
    main_state = directory.load_file(info.path, "model.pt")
    main_state["1.running_mean"] = main_state["1.running_mean"] + 100.0
    torch.save(main_state, info.path / "model.pt")
    model[1].running_mean.zero_()
    checkpointer.restore(_as_format_1(info.path), print)
    assert torch.equal(model[1].running_mean, own)

    payload = directory.load_file(info.path, rank_file(0))
    del payload["buffers"]
    torch.save(payload, info.path / rank_file(0))
    checkpointer.restore(_as_format_1(info.path), print)
    assert torch.equal(model[1].running_mean, own + 100.0)


def _as_format_1(path: Path) -> directory.CheckpointInfo:
    """Rewrite the manifest as checkpoints were written before checksums (format 1: the size of
    every file, rank files included, nothing else) and read it back."""
    manifest = json.loads((path / MANIFEST).read_text())
    (path / directory.RANK_TABLE).unlink(missing_ok=True)
    sizes = {p.name: p.stat().st_size for p in path.iterdir() if p.name != MANIFEST}
    old = {key: manifest[key] for key in ("step", "world_size", "metadata")}
    (path / MANIFEST).write_text(json.dumps({"format_version": 1, **old, "files": sizes}))
    info = read_manifest(path)
    assert (info.format_version, info.geometry) == (1, None)
    return info


# --- a checkpoint through the Checkpointer, its random streams included ------------------------------
class _LoopState:
    """The loop's part of a checkpoint, shaped as the trainer's (``state`` is its position)."""

    def __init__(self) -> None:
        self.state = TrainState()

    def state_dict(self) -> dict:
        return {"state": self.state.state_dict()}

    def load_state_dict(self, saved: dict) -> None:
        self.state.load_state_dict(saved["state"])


@pytest.fixture
def accelerator():
    """A real one-process Accelerator; Accelerate's singletons are reset afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_a_restored_checkpoint_continues_every_random_stream(tmp_path, accelerator):
    """Save; train on (dropout draws from the global torch RNG, the task's random crops and flips
    from its own generator) and draw from Python's, NumPy's and torch's generators; disturb them
    all; restore: the same steps give the same weights bitwise and the same draws repeat."""
    from tvlars_scale.build import image_data
    from tvlars_scale.tasks import build_task

    config = Config.model_validate({"data": {"name": "digits", "crop_padding": 2, "flip": True}})
    data = image_data(config)
    task = build_task(config, data, rank=0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)
    )
    optimizer = TVLARS(layerwise_param_groups(model, 5e-4), lr=2.0, eta=0.01)
    loop = _LoopState()
    checkpointer = Checkpointer(
        accelerator, model, optimizer, task, tmp_path, keep_last=2, train_state=loop
    )

    def train_and_draw(num_steps: int) -> tuple[dict, tuple]:
        for _ in range(num_steps):
            batch = slice(loop.state.num_samples, loop.state.num_samples + 64)
            optimizer.zero_grad()
            task.training_loss(model, data.train_images[batch], data.train_labels[batch]).backward()
            optimizer.step()
            loop.state.step += 1
            loop.state.num_samples += 64
        params = {name: p.detach().clone() for name, p in model.named_parameters()}
        return params, _draw()

    train_and_draw(2)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # a cached Gaussian in NumPy's state
    checkpointer.save(loop.state.step)
    expected_params, expected_draws = train_and_draw(3)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    task.training_loss(model, data.train_images[:8], data.train_labels[:8])  # moves the crops on

    checkpointer.restore(find_latest_complete(tmp_path), print)
    assert loop.state.step == 2
    params, draws = train_and_draw(3)
    assert draws == expected_draws
    for name, p in params.items():
        assert torch.equal(p, expected_params[name]), name


def test_a_key_added_after_the_checkpoint_is_no_change_at_its_default():
    """A checkpoint written before a key existed resumes while the key holds its default (the
    default keeps what the run did); set to anything else, it is a change like any other."""
    older = _config()
    del older["data"]["mixup_alpha"], older["data"]["augment"]
    assert policy.config_changes(older, _config()) == []
    mixed = _config(data__mixup_alpha=0.2)
    assert policy.config_changes(older, mixed) == [("data.mixup_alpha", None, 0.2)]
    older["data"]["augment"] = "randaugment"  # in the saved config: compared as always
    assert ("data.augment", "randaugment", "none") in policy.config_changes(older, mixed)
