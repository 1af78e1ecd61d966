"""A run resumes at any world size with the same global batch, also one that does not divide over the
new ranks (micro batches that differ by one sample, each rank's loss weighted by its count).

The digits GroupNorm CNN of test_resume.py without random crops: every sample's loss does not depend
on which rank computes it, so a run resumed at another world size continues the reference's loss
curve up to the order of the sums (``LOSS_RTOL``), and at the same world size bitwise. The 8-rank
cases (ZeRO-2 and FSDP2 saved at 8, resumed at 8, 6 and 5) are ``long``; 3 ranks saved and resumed
at 2 runs by default.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from launching import REPO_ROOT, accelerate_launcher, train_command, trainer_env
from test_resume import (
    GLOBAL_BATCH,
    ZERO2,
    assert_same_checkpoint,
    checkpoint,
    launch,
    load_file,
    steps,
    train_losses,
    write_config,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LOSS_RTOL = 1e-4  # as test_resume.py's resume on another world size
NO_CROPS = {"data": {"crop_padding": 0}, "run": {"trackers": ["tensorboard"]}}
ONE_EPOCH = {**NO_CROPS, "run": {**NO_CROPS["run"], "num_epochs": 1}}


def train(engine: str, config: Path, world_size: int, *overrides: str) -> str:
    """Run the trainer on ``world_size`` ranks of ``engine``; returns rank 0's output."""
    if engine == "zero2":
        result = launch(config, ZERO2, *overrides, world_size=world_size, timeout=900)
        assert result.returncodes == [0] * world_size, result.describe()
        return result.outputs[0]
    launcher = accelerate_launcher("accelerate_fsdp2.yaml", "--num_processes", str(world_size))
    env = {k: v for k, v in trainer_env().items() if not k.startswith("TVLARS_FAULT_")}
    result = subprocess.run(
        train_command("--config", str(config), *overrides, launcher=launcher),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def assert_continues(run_dir: Path, reference_dir: Path, resumed_at: int, last_step: int) -> None:
    """The resumed run's losses follow the reference's; it ends at the same samples and step."""
    expected, resumed = train_losses(reference_dir), train_losses(run_dir)
    assert sorted(resumed) == list(range(resumed_at + 1, last_step + 1))
    worst = max(abs(resumed[s] - expected[s]) / expected[s] for s in resumed)
    print(f"{run_dir.name}: worst relative train-loss difference {worst:.2e}")
    assert worst < LOSS_RTOL
    final, reference_final = (
        load_file(checkpoint(d, last_step), "trainer.pt")["state"] for d in (run_dir, reference_dir)
    )
    assert final == reference_final


def test_a_run_saved_at_3_ranks_resumes_at_2(tmp_path):
    # 128 over 3 ranks at micro 32: 2 rounds of 22 + 21 + 21; over 2: 32 micro x 2 accumulation.
    reference_dir = tmp_path / "three"
    config = write_config(tmp_path, reference_dir, **ONE_EPOCH)
    output = train("zero2", config, 3)
    assert (
        f"effective batch {GLOBAL_BATCH} = 3 ranks x 2 accumulation x 21-22 micro "
        "(2 of the 6 micro batches take 22)" in output
    )
    assert steps(reference_dir) == [4, 8, 11]

    run_dir = tmp_path / "two"
    config = write_config(tmp_path, run_dir, **ONE_EPOCH)
    output = train("zero2", config, 2, f"checkpoint.resume={checkpoint(reference_dir, 4)}")
    assert f"effective batch {GLOBAL_BATCH} = 32 micro x 2 accumulation x 2 ranks" in output
    assert steps(run_dir) == [8, 11]
    assert_continues(run_dir, reference_dir, resumed_at=4, last_step=11)


@pytest.mark.long  # eight trainers per launch, seven launches each: minutes
@pytest.mark.parametrize("engine", ["zero2", "fsdp2"])
def test_runs_saved_at_8_ranks_resume_at_8_6_and_5(engine, tmp_path):
    reference_dir = tmp_path / "eight"
    config = write_config(tmp_path, reference_dir, **NO_CROPS)
    output = train(engine, config, 8)
    assert f"effective batch {GLOBAL_BATCH} = 16 micro x 1 accumulation x 8 ranks" in output
    assert steps(reference_dir) == [4, 8, 12, 16, 20, 22]
    saved = f"checkpoint.resume={checkpoint(reference_dir, 8)}"

    same = tmp_path / "again-8"
    train(engine, write_config(tmp_path, same, **NO_CROPS), 8, saved)
    assert steps(same) == [12, 16, 20, 22]
    for step in (12, 16, 20, 22):
        assert_same_checkpoint(checkpoint(same, step), checkpoint(reference_dir, step))

    for world_size, split in ((6, "21-22 micro (2 of the 6"), (5, "25-26 micro (3 of the 5")):
        run_dir = tmp_path / f"at-{world_size}"
        output = train(engine, write_config(tmp_path, run_dir, **NO_CROPS), world_size, saved)
        assert f"{world_size} ranks x 1 accumulation x {split} micro batches take" in output
        assert steps(run_dir) == [12, 16, 20, 22]
        assert_continues(run_dir, reference_dir, resumed_at=8, last_step=22)
