"""The trainer end to end: quick start on one process and under ZeRO-2, two "nodes" on one machine,
gradient accumulation, a 16K effective batch, and setup-time errors."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from launching import (
    REPO_ROOT,
    accelerate_launcher,
    free_port,
    launch,
    read_metrics,
    train_command,
    trainer_env,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tvlars_scale.config import load_config
from tvlars_scale.trainer import Trainer

QUICK_START = "configs/digits.yaml"
DIGITS_TRAIN_SIZE = 1437  # 80% of scikit-learn's 1,797 digits


@pytest.fixture
def fresh_accelerate_state():
    """In-process trainers share Accelerate's singletons: give each test its own."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_quick_start_single_process(tmp_path):
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    result = launch(train_command("--config", QUICK_START, f"run.output_dir={run_dir}"))
    seconds = time.perf_counter() - started
    metrics = read_metrics(run_dir)
    assert metrics["final"]["test_accuracy"] >= 0.90, metrics["history"]
    print(f"quick start, one process: {seconds:.0f} s, {metrics['final']}")

    assert "effective batch 256 = 32 micro x 8 accumulation x 1 rank" in result.stdout
    assert metrics["num_steps"] == (DIGITS_TRAIN_SIZE // 256) * metrics["num_epochs"]
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["run"]["output_dir"] == str(run_dir)
    assert resolved == load_config(QUICK_START, [f"run.output_dir={run_dir}"]).model_dump(
        mode="json"
    )
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = set(events.Tags()["scalars"])
    expected = {"train_loss", "test_accuracy", "test_loss", "lr", "phi_t", "samples_per_second"}
    expected |= {"trust_ratio/min", "trust_ratio/median", "trust_ratio/max"}
    assert expected <= logged
    phi = [event.value for event in events.Scalars("phi_t")]
    assert phi == sorted(phi, reverse=True) and phi[0] > phi[-1]  # TVLARS' factor decays


@pytest.fixture(scope="module")
def zero2_quick_start(tmp_path_factory) -> dict:
    """The quick start on two processes under ZeRO-2, as the README launches it."""
    run_dir = tmp_path_factory.mktemp("zero2") / "run"
    result = launch(
        train_command(
            "--config",
            QUICK_START,
            f"run.output_dir={run_dir}",
            launcher=accelerate_launcher("accelerate_zero2.yaml"),
        )
    )
    return {"stdout": result.stdout, "metrics": read_metrics(run_dir)}


@pytest.mark.distributed
@pytest.mark.slow
def test_quick_start_two_processes_zero2(zero2_quick_start):
    metrics = zero2_quick_start["metrics"]
    assert metrics["final"]["test_accuracy"] >= 0.90, metrics["history"]
    assert (
        "effective batch 256 = 32 micro x 4 accumulation x 2 ranks" in zero2_quick_start["stdout"]
    )
    assert (metrics["world_size"], metrics["grad_accum_steps"]) == (2, 4)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.long  # ~60 s; `pytest -m long`
def test_two_nodes_on_one_machine_match_one_node(zero2_quick_start, tmp_path):
    run_dir = tmp_path / "run"
    port = str(free_port())
    nodes = []
    for machine_rank in (0, 1):
        # One process per "node": num_processes counts the processes of all machines.
        launcher = (
            "--config_file",
            "launch/accelerate_multinode_zero2.yaml",
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(machine_rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
        )
        command = train_command(
            "--config", QUICK_START, f"run.output_dir={run_dir}", launcher=launcher
        )
        nodes.append(
            subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=trainer_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    multi_node = read_metrics(run_dir)["history"]
    one_node = zero2_quick_start["metrics"]["history"]
    # Same ranks, same arithmetic (one thread per process in both runs): every evaluation of the
    # 20 epochs must agree to the last bit, rendezvous over two "nodes" or one.
    assert multi_node == one_node


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_node_recipe_matches_zero2(zero2_quick_start, tmp_path):
    # Plain DDP (every rank steps whole layers) against ZeRO-2 (layers cut into flat partitions):
    # the same training up to the order of floating-point sums in the gradient reduction.
    run_dir = tmp_path / "run"
    launcher = accelerate_launcher("accelerate_node.yaml", "--num_processes", "2")
    overrides = [f"run.output_dir={run_dir}", "run.num_epochs=2"]
    result = launch(train_command("--config", QUICK_START, *overrides, launcher=launcher))
    assert "effective batch 256 = 32 micro x 4 accumulation x 2 ranks" in result.stdout
    ddp = read_metrics(run_dir)["history"]
    zero2 = zero2_quick_start["metrics"]["history"][: len(ddp)]
    for ours, reference in zip(ddp, zero2, strict=True):
        assert ours["step"] == reference["step"]
        assert ours["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-4)


def _parameters_after_steps(tmp_path: Path, micro_batch_size: int, num_steps: int) -> dict:
    config = load_config(
        QUICK_START,
        [
            f"run.output_dir={tmp_path / f'micro{micro_batch_size}_steps{num_steps}'}",
            "run.trackers=[]",
            "run.progress_bar=false",
            "batch.global_batch_size=32",
            f"batch.micro_batch_size={micro_batch_size}",
            # Augmentation draws per micro-batch; without it both splits see identical pixels.
            "data.crop_padding=0",
        ],
    )
    trainer = Trainer(config)
    trainer.setup()
    micro_batches = iter(trainer.train_loader)
    for _ in range(num_steps):
        trainer.train_step([next(micro_batches) for _ in range(trainer.plan.grad_accum_steps)])
    assert trainer.state.step == num_steps
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.close()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return params


def test_accumulation_matches_one_big_micro_batch(tmp_path, fresh_accelerate_state):
    # digits_cnn uses GroupNorm: no batch statistics, so the split must not change the gradient.
    accumulated = _parameters_after_steps(tmp_path, micro_batch_size=8, num_steps=4)
    whole = _parameters_after_steps(tmp_path, micro_batch_size=32, num_steps=4)
    initial = _parameters_after_steps(tmp_path, micro_batch_size=32, num_steps=0)
    assert accumulated.keys() == whole.keys() == initial.keys()
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-6)
    # The comparison means something only if training moved the weights well beyond that tolerance.
    moved = max((whole[name] - initial[name]).abs().max().item() for name in whole)
    assert moved > 1e-2


def test_a_nonfinite_step_is_skipped_and_changes_nothing(
    tmp_path, fresh_accelerate_state, monkeypatch
):
    """Attempt 1's loss is NaN (the fault hook), so every gradient is: the step is skipped with the
    weights and optimizer state untouched and counted; the next step is applied and ends the streak."""
    monkeypatch.setenv("TVLARS_FAULT_NAN_STEPS", "1")
    config = load_config(
        QUICK_START,
        [
            f"run.output_dir={tmp_path / 'run'}",
            "run.trackers=[]",
            "run.progress_bar=false",
            "batch.global_batch_size=32",
        ],
    )
    trainer = Trainer(config)
    trainer.setup()
    micro_batches = iter(trainer.train_loader)

    def step() -> None:
        trainer.train_step([next(micro_batches) for _ in range(trainer.plan.grad_accum_steps)])

    def snapshot() -> dict:
        """Every parameter and optimizer-state entry, by name."""
        flat = {}
        for name, p in trainer.model.named_parameters():
            flat[name] = p.detach().clone()
            for key, value in trainer.optimizer.state[p].items():
                flat[f"{name}.{key}"] = value.clone() if torch.is_tensor(value) else value
        return flat

    def counters() -> tuple[int, int, int]:
        state = trainer.state
        return state.step, state.num_skipped_steps, state.nonfinite_in_row

    step()
    before = snapshot()
    step()  # NaN: skipped
    assert counters() == (1, 1, 1)
    after = snapshot()
    assert after.keys() == before.keys()
    for key, value in before.items():
        same = torch.equal(after[key], value) if torch.is_tensor(value) else after[key] == value
        assert same, key
    step()
    assert counters() == (2, 1, 0)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    trainer.close()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.long  # ~35 s; the 16K plan itself is unit-tested in test_batching.py
def test_effective_batch_16384_on_two_ranks(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        f"run.output_dir={run_dir}",
        "run.num_epochs=1",
        "run.trackers=[]",
        "data.name=synthetic",
        "data.image_size=8",
        "data.num_synthetic=32768",  # two optimizer steps of 16384
        "model.name=digits_cnn",
        "batch.global_batch_size=16384",
        "batch.micro_batch_size=64",
    ]
    launcher = accelerate_launcher("accelerate_zero2.yaml")
    result = launch(train_command("--config", QUICK_START, *overrides, launcher=launcher))
    assert "effective batch 16384 = 64 micro x 128 accumulation x 2 ranks" in result.stdout
    metrics = read_metrics(run_dir)
    assert (metrics["num_steps"], metrics["num_samples"]) == (2, 32768)
    assert metrics["grad_accum_steps"] == 128


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.long  # ~45 s
def test_bf16_under_zero2(tmp_path):
    # DeepSpeed keeps bf16 weights and does not cast inputs: the trainer autocasts the forward.
    run_dir = tmp_path / "run"
    overrides = [f"run.output_dir={run_dir}", "run.mixed_precision=bf16", "run.num_epochs=3"]
    launcher = accelerate_launcher("accelerate_zero2.yaml")
    launch(train_command("--config", QUICK_START, *overrides, launcher=launcher))
    history = read_metrics(run_dir)["history"]
    assert history[-1]["test_loss"] < history[0]["test_loss"]
    assert history[-1]["test_accuracy"] > 0.5  # ten classes: chance is 0.1


def _cli_error(tmp_path: Path, *overrides: str) -> tuple[str, Path]:
    run_dir = tmp_path / "run"
    result = subprocess.run(
        train_command("--config", QUICK_START, f"run.output_dir={run_dir}", *overrides),
        cwd=REPO_ROOT,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.splitlines()) == 1, result.stderr[-2000:]
    return result.stderr.strip(), run_dir


# ~12 s each; the same four cases run in one process in test_resume.py's bad-input corpus.
@pytest.mark.long
@pytest.mark.parametrize(
    ("overrides", "line_start"),
    [
        (["model.name=resnet_9000"], "config error: model.name: unknown model 'resnet_9000'"),
        (["batch.global_batch_size=2048"], "config error: batch.global_batch_size: 2048 is larger"),
        (["data.name=cifar10", "data.path=/nonexistent/cifar"], "config error: data.path: "),
        (["run.mixed_precision=fp16"], "config error: run.mixed_precision: fp16 needs a GPU"),
    ],
)
def test_setup_errors_are_one_line_and_write_nothing(tmp_path, overrides, line_start):
    line, run_dir = _cli_error(tmp_path, *overrides)
    assert line.startswith(line_start)
    assert not run_dir.exists()


def test_a_run_directory_is_not_overwritten_by_accident(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    previous = run_dir / "metrics.json"
    previous.write_text('{"final": "keep me"}')
    line, _ = _cli_error(tmp_path)
    assert line.startswith("config error: run.output_dir: ")
    assert "run.overwrite=true" in line
    assert previous.read_text() == '{"final": "keep me"}'
