"""Checkpoint and resume end to end, with real processes, real signals and real SIGKILLs.

The trainer runs a tiny GroupNorm CNN on scikit-learn's digits (fp32, CPU, fixed seed) for
``NUM_STEPS`` optimizer steps, checkpointing every ``EVERY`` steps. An uninterrupted reference run
per setting (one process, DDP x2, ZeRO-2 x2) keeps all its checkpoints; a faulty run is then killed,
pre-empted or fed NaNs, resumed with ``checkpoint.resume=auto``, and every checkpoint it writes after
the resume (its final one included) must equal the reference's checkpoint of the same step
BITWISE: model, every rank's optimizer state and master weights, random states, trainer state.

Ranks are started the way ``torchrun`` / ``accelerate launch`` start them (RANK, WORLD_SIZE,
MASTER_ADDR... and Accelerate's DeepSpeed variables), one subprocess each, so a test can SIGKILL
them and read every rank's exit status. Faults come from ``tvlars_scale.fault_injection``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from launching import REPO_ROOT, free_port, trainer_env

from tvlars_scale.checkpoint.directory import (
    CHECKPOINTS_DIR,
    complete_checkpoints,
    load_file,
    rank_file,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DEEPSPEED_ZERO2 = REPO_ROOT / "launch" / "deepspeed_zero2.json"
GLOBAL_BATCH, MICRO_BATCH = 128, 32  # 1437 digits -> 11 steps per epoch
NUM_EPOCHS, STEPS_PER_EPOCH = 2, 11
NUM_STEPS = NUM_EPOCHS * STEPS_PER_EPOCH
EVERY = 4
KILLED = -signal.SIGKILL

BASE_CONFIG = {
    "run": {
        "seed": 0,
        "num_epochs": NUM_EPOCHS,
        "log_every": 1,
        "trackers": [],
        "progress_bar": False,
    },
    # A one-pixel random crop: the augmentation generators must be restored for bitwise equality.
    "data": {"name": "digits", "crop_padding": 1, "flip": False},
    "model": {"name": "digits_cnn"},
    "batch": {"global_batch_size": GLOBAL_BATCH, "micro_batch_size": MICRO_BATCH},
    # phi_t and the cosine schedule vary within the run, so a wrong step counter shows.
    "optim": {
        "name": "tvlars",
        "lr": 4.0,
        "lmbda": 0.05,
        "delay_epochs": 0.5,
    },
    "schedule": {"name": "warmup_cosine", "warmup_epochs": 0.5},
    "checkpoint": {"every_steps": EVERY, "keep_last": 100},
}


@dataclass(frozen=True)
class Setting:
    name: str
    world_size: int
    deepspeed: bool


SINGLE = Setting("single", 1, False)
DDP = Setting("ddp", 2, False)
ZERO2 = Setting("zero2", 2, True)
ZERO2_PLAIN = Setting("zero2_plain", 2, True)  # no random augmentation: the world-size test's


def write_config(directory: Path, run_dir: Path, name: str | None = None, **sections) -> Path:
    config = {key: dict(value) for key, value in BASE_CONFIG.items()}
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    config["run"]["output_dir"] = str(run_dir)
    path = directory / (name or f"{run_dir.name}.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Launch:
    returncodes: list[int]
    outputs: list[str]

    def describe(self) -> str:
        return "\n".join(
            f"--- rank {rank} exit {code}\n{out[-4000:]}"
            for rank, (code, out) in enumerate(zip(self.returncodes, self.outputs, strict=True))
        )


def launch(
    config: Path,
    setting: Setting,
    *overrides: str,
    world_size: int | None = None,
    faults: dict[str, str] | None = None,
    timeout: float = 240,
) -> Launch:
    """Start every rank of ``tvlars_scale.train`` as its own process; wait for all of them."""
    world_size = world_size or setting.world_size
    env = {
        k: v
        for k, v in trainer_env().items()
        if not k.startswith(("TVLARS_FAULT_", "ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))
    }
    env.update(PYTHONUNBUFFERED="1", **(faults or {}))
    if world_size > 1 or setting.deepspeed:
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
        )
    if setting.deepspeed:
        env.update(
            ACCELERATE_USE_DEEPSPEED="true",
            ACCELERATE_DEEPSPEED_CONFIG_FILE=str(DEEPSPEED_ZERO2),
            ACCELERATE_MIXED_PRECISION="no",
        )
    command = [sys.executable, "-m", "tvlars_scale.train", "--config", str(config), *overrides]
    processes = []
    for rank in range(world_size):
        rank_env = dict(env)
        if "WORLD_SIZE" in env:
            rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank))
        processes.append(
            subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return Launch([p.returncode for p in processes], outputs)


# ZeRO-2, the default run's bitwise resume, crops and flips at random: every rank's augmentation
# generator must come back. The world-size test runs without random augmentation (its ranks cannot
# continue each other's augmentation streams), against a reference of its own.
SECTIONS = {
    "single": {},
    "ddp": {},
    "zero2": {"data": {"flip": True}},
    "zero2_plain": {"data": {"crop_padding": 0}, "run": {"trackers": ["tensorboard"]}},
}


def steps(run_dir: Path) -> list[int]:
    return [info.step for info in complete_checkpoints(run_dir / CHECKPOINTS_DIR)]


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS_DIR / f"step-{step}"


def rank_files(path: Path) -> list[str]:
    return sorted(
        p.name for p in path.iterdir() if p.name.startswith("rank-") and p.suffix == ".pt"
    )


def assert_equal(a, b, where: str) -> None:
    """Bitwise equality of nested checkpoint payloads."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal(x, y, f"{where}[{index}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), (
            f"{where}: differs by up to {(a.double() - b.double()).abs().max()}"
        )
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_checkpoint(path: Path, reference: Path) -> None:
    """Everything two checkpoints of one step hold: model, trainer state, every rank's file."""
    assert rank_files(path) == rank_files(reference)
    for name in ["model.pt", "trainer.pt", *rank_files(reference)]:
        assert_equal(load_file(path, name), load_file(reference, name), f"{path.name}/{name}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def reference(workspace):
    """``reference(setting)``: (config, run directory) of the uninterrupted run, run once."""
    runs: dict[str, tuple[Path, Path]] = {}

    def get(setting: Setting) -> tuple[Path, Path]:
        if setting.name not in runs:
            run_dir = workspace / f"reference-{setting.name}"
            config = write_config(workspace, run_dir, **SECTIONS[setting.name])
            result = launch(config, setting)
            assert result.returncodes == [0] * setting.world_size, result.describe()
            assert steps(run_dir) == [4, 8, 12, 16, 20, 22]
            runs[setting.name] = config, run_dir
        return runs[setting.name]

    return get


# ZeRO-2 (the strictest: every rank's partition) in the default run; one process and DDP (~100 s
# each) with `pytest -m long`.
@pytest.mark.parametrize(
    "setting",
    [pytest.param(s, marks=pytest.mark.long) for s in (SINGLE, DDP)] + [ZERO2],
    ids=lambda s: s.name,
)
def test_killed_and_preempted_runs_resume_bitwise(setting, reference, workspace):
    _, reference_dir = reference(setting)
    # Checkpoints of consecutive steps differ: the bitwise comparisons below can fail.
    with pytest.raises(AssertionError):
        assert_same_checkpoint(checkpoint(reference_dir, 20), checkpoint(reference_dir, 16))
    run_dir = workspace / f"faulty-{setting.name}"
    config = write_config(workspace, run_dir, **SECTIONS[setting.name])
    every_rank = setting.world_size

    # 1. SIGKILL on every rank inside the save of step 8, after the rank files, before publishing.
    result = launch(config, setting, faults={"TVLARS_FAULT_KILL": "in_save:8"})
    assert result.returncodes == [KILLED] * every_rank, result.describe()
    assert (run_dir / CHECKPOINTS_DIR / ".tmp-step-8" / rank_file(0)).is_file()
    assert steps(run_dir) == [4]

    # 2. Resume (the torn step 8 is ignored and cleared); SIGTERM to rank 0 only after step 10:
    # every rank saves step 10 and exits 0.
    result = launch(
        config, setting, "checkpoint.resume=auto", faults={"TVLARS_FAULT_SIGTERM": "10"}
    )
    assert result.returncodes == [0] * every_rank, result.describe()
    assert (
        "resumed from" in result.outputs[0] and "stopping at step 10 (SIGTERM)" in result.outputs[0]
    )
    assert steps(run_dir) == [4, 8, 10]
    assert not (run_dir / CHECKPOINTS_DIR / ".tmp-step-8").exists()
    assert not (run_dir / "metrics.json").exists()

    # 3. Resume; SIGKILL on every rank once step 14 is done (the last checkpoint is step 12).
    result = launch(
        config, setting, "checkpoint.resume=auto", faults={"TVLARS_FAULT_KILL": "boundary:14"}
    )
    assert result.returncodes == [KILLED] * every_rank, result.describe()
    assert steps(run_dir) == [4, 8, 10, 12]

    # 4. Resume to the end.
    result = launch(config, setting, "checkpoint.resume=auto")
    assert result.returncodes == [0] * every_rank, result.describe()
    assert steps(run_dir) == [4, 8, 10, 12, 16, 20, 22]
    for step in (8, 12, 16, 20, 22):
        assert_same_checkpoint(checkpoint(run_dir, step), checkpoint(reference_dir, step))
    # The records the killed runs wrote past their checkpoint were dropped and written again.
    stats = [(d / "layer_stats.jsonl").read_text() for d in (run_dir, reference_dir)]
    assert stats[0] == stats[1]
    histories = [
        json.loads((d / "metrics.json").read_text())["history"] for d in (run_dir, reference_dir)
    ]
    assert histories[0] == histories[1]


def train_losses(run_dir: Path) -> dict[int, float]:
    """``train_loss`` by optimizer step from the run's TensorBoard events (the last write wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for events in sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "train_loss" in accumulator.Tags()["scalars"]:  # hparams have files of their own
            losses.update({e.step: e.value for e in accumulator.Scalars("train_loss")})
    return losses


# Resuming on another world size changes only the order in which gradients are summed (same
# micro-batches, same samples per step, no random augmentation in this setting), so the loss must
# continue the reference's curve: every later step within this relative tolerance.
LOSS_RTOL = 1e-4


@pytest.mark.long  # ~45 s
def test_zero2_resumes_on_one_rank_and_back_on_two(reference, workspace):
    _, reference_dir = reference(ZERO2_PLAIN)
    run_dir = workspace / "resized"
    config = write_config(workspace, run_dir, **SECTIONS[ZERO2_PLAIN.name])

    # 2 -> 1: the 2-rank checkpoint of step 8 continues on one rank, pre-empted after step 16.
    result = launch(
        config,
        ZERO2_PLAIN,
        f"checkpoint.resume={checkpoint(reference_dir, 8)}",
        world_size=1,
        faults={"TVLARS_FAULT_SIGTERM": "16"},
    )
    assert result.returncodes == [0], result.describe()
    assert "effective batch 128 = 32 micro x 4 accumulation x 1 rank" in result.outputs[0]
    assert "resuming a 2-rank checkpoint on 1 rank:" in result.outputs[0]
    assert steps(run_dir) == [12, 16]
    assert rank_files(checkpoint(run_dir, 16)) == [rank_file(0)]

    # 1 -> 2: that one-rank checkpoint continues on two ranks to the end.
    result = launch(config, ZERO2_PLAIN, "checkpoint.resume=auto", world_size=2)
    assert result.returncodes == [0, 0], result.describe()
    assert "effective batch 128 = 32 micro x 2 accumulation x 2 ranks" in result.outputs[0]
    assert "resuming a 1-rank checkpoint on 2 ranks" in result.outputs[0]
    assert steps(run_dir) == [12, 16, 20, 22]

    expected, resized = train_losses(reference_dir), train_losses(run_dir)
    assert sorted(resized) == list(range(9, NUM_STEPS + 1))
    worst = max(abs(resized[s] - expected[s]) / expected[s] for s in resized)
    print(f"2->1->2 ranks: worst relative train-loss difference {worst:.2e}")
    assert worst < LOSS_RTOL
    assert resized[NUM_STEPS] < 0.8 * expected[8]  # and training went on (the loss fell)
    # The data position was converted, not restarted: same samples consumed, same epoch.
    final, reference_final = (
        load_file(checkpoint(d, 22), "trainer.pt") for d in (run_dir, reference_dir)
    )
    assert final["state"] == reference_final["state"]


@pytest.mark.parametrize("setting", [SINGLE, ZERO2], ids=lambda s: s.name)
def test_nonfinite_steps_are_skipped_and_change_nothing(setting, reference, workspace):
    """NaN gradients in attempts 4 and 5: both skipped; the run is then pre-empted and saves step 4,
    which must hold exactly the model and optimizer state of the reference's step 4."""
    _, reference_dir = reference(setting)
    run_dir = workspace / f"nan-{setting.name}"
    config = write_config(workspace, run_dir, **SECTIONS[setting.name])
    result = launch(
        config, setting, faults={"TVLARS_FAULT_NAN_STEPS": "4,5", "TVLARS_FAULT_SIGTERM": "6"}
    )
    assert result.returncodes == [0] * setting.world_size, result.describe()
    output = result.outputs[0]
    assert "step 4: NaN/Inf gradients, optimizer step skipped (1 in a row, 1 in all)" in output
    assert "step 4: NaN/Inf gradients, optimizer step skipped (2 in a row, 2 in all)" in output
    saved, expected = checkpoint(run_dir, 4), checkpoint(reference_dir, 4)
    state = load_file(saved, "trainer.pt")["state"]
    assert (state["step"], state["num_skipped_steps"], state["nonfinite_in_row"]) == (4, 2, 2)
    assert state["micro_batch"] > load_file(expected, "trainer.pt")["state"]["micro_batch"]
    assert_equal(load_file(saved, "model.pt"), load_file(expected, "model.pt"), "model")
    for name in rank_files(expected):  # optimizer state, step counters and master weights
        assert_equal(load_file(saved, name)["layers"], load_file(expected, name)["layers"], name)


def test_too_many_nonfinite_steps_stop_the_run(reference, workspace):
    _, reference_dir = reference(SINGLE)
    run_dir = workspace / "nan-abort"
    config = write_config(workspace, run_dir)
    result = launch(
        config, SINGLE, "run.max_nonfinite_steps=3", faults={"TVLARS_FAULT_NAN_STEPS": "5,6,7"}
    )
    assert result.returncodes == [3], result.describe()
    last_line = result.outputs[0].strip().splitlines()[-1]
    assert last_line.startswith(
        "training stopped: 3 optimizer steps in a row had NaN/Inf gradients at step 5 "
        "(run.max_nonfinite_steps=3); last checkpoint: "
    ), last_line
    assert last_line.endswith("step-4") and "Traceback" not in result.outputs[0]
    assert steps(run_dir) == [4] and not (run_dir / "metrics.json").exists()
    assert_same_checkpoint(checkpoint(run_dir, 4), checkpoint(reference_dir, 4))


@pytest.fixture(scope="module")
def world(reference, workspace) -> Path:
    """An existing run with checkpoints (and a torn one), configs and paths the bad cases name."""
    _, reference_dir = reference(SINGLE)
    root = workspace / "world"
    shutil.copytree(reference_dir, root / "run")
    torn = root / "run" / CHECKPOINTS_DIR / ".tmp-step-12"
    shutil.copytree(checkpoint(reference_dir, 12), torn)
    (torn / "checkpoint.json").unlink()
    write_config(root, root / "run", name="good.yaml")
    (root / "malformed.yaml").write_text("run:\n  seed: 0\n  num_epochs: [2\n")
    (root / "list.yaml").write_text("- run\n- data\n")
    (root / "a-file").write_text("not a directory\n")
    (root / "other").mkdir()
    (root / "other" / "metrics.json").write_text("{}\n")
    return root


def test_bad_inputs_exit_2_with_one_line_and_touch_nothing(world, workspace):
    """Every case in ONE process through the CLI entry function (tests/integration/bad_inputs.py)."""
    results_path = workspace / "bad_inputs.json"
    worker = Path(__file__).with_name("bad_inputs.py")
    completed = subprocess.run(
        [sys.executable, str(worker), str(world), str(results_path)],
        cwd=REPO_ROOT,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads(results_path.read_text())
    assert len(results) >= 20
    for result in results:
        where = f"{result['case']}: {result['stderr']!r}"
        assert result["code"] == 2, where
        assert result["stdout"] == "", where
        lines = result["stderr"].splitlines()
        assert len(lines) == 1 and "Traceback" not in result["stderr"], where
        assert lines[0].startswith(f"config error: {result['key']}: "), where
        assert result["changed"] == [], f"{result['case']} changed {result['changed']}"
    assert not (world / "new").exists()


def test_bad_inputs_through_real_processes(world):
    """Two cases as users meet them: a real CLI process, and two ranks that must both refuse."""
    before = sorted(p.stat().st_mtime_ns for p in world.rglob("*"))
    result = launch(world / "good.yaml", SINGLE, "checkpoint.resume=auto", "optim.name=lars")
    assert result.returncodes == [2]
    assert result.outputs[0].startswith("config error: optim.name: is 'lars' but checkpoint ")
    assert result.outputs[0].count("\n") == 1, result.outputs[0]

    new_run = world / "two-ranks"
    result = launch(
        world / "good.yaml",
        DDP,
        f"run.output_dir={new_run}",
        "batch.global_batch_size=1",  # not a sample for each rank
    )
    assert result.returncodes == [2, 2], result.describe()
    assert result.outputs == [
        "config error: batch.global_batch_size: 1 is smaller than the world size 2: some ranks "
        "would get no sample\n",
        "",
    ], result.describe()
    assert not new_run.exists()
    assert sorted(p.stat().st_mtime_ns for p in world.rglob("*")) == before
