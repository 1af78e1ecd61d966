"""Operating long jobs: the dry run, one writer per run directory, one-line restore errors."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from launching import REPO_ROOT, accelerate_launcher, train_command, trainer_env

QUICK_START = "configs/digits.yaml"


def run(*args: str, launcher: tuple[str, ...] = (), timeout: float = 300):
    return subprocess.run(
        train_command("--config", QUICK_START, *args, launcher=launcher),
        cwd=REPO_ROOT,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
    }


@pytest.mark.long  # ~60 s: dry runs through real launches
def test_dry_run_prints_the_plan_for_the_launch_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    zero2 = accelerate_launcher("accelerate_zero2.yaml")
    result = run("--dry-run", f"run.output_dir={run_dir}", launcher=zero2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch 256 = 32 micro x 4 accumulation x 2 ranks" in result.stdout
    assert "--- resolved config ---" in result.stdout and "lmbda: 0.01" in result.stdout
    assert "a new run in" in result.stdout
    assert not run_dir.exists()

    # 97 does not divide over 2 ranks: planned as micro batches of 24 and 25 samples.
    result = run(
        "--dry-run", f"run.output_dir={run_dir}", "batch.global_batch_size=97", launcher=zero2
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "effective batch 97 = 2 ranks x 2 accumulation x 24-25 micro "
        "(1 of the 4 micro batches takes 25)" in result.stdout
    )
    # One sample cannot feed two ranks: refused for this launch, in one line (the ranks exit 2;
    # the launcher reports its failed workers after it).
    result = run(
        "--dry-run", f"run.output_dir={run_dir}", "batch.global_batch_size=1", launcher=zero2
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("config error")]
    assert errors == [
        "config error: batch.global_batch_size: 1 is smaller than the world size 2: some ranks "
        "would get no sample"
    ]
    assert "exitcode  : 2" in result.stderr
    result = run(
        "--dry-run",
        f"run.output_dir={run_dir}",
        "data.name=cifar10",
        f"data.path={tmp_path / 'no-cifar'}",
    )
    assert result.returncode == 2
    assert result.stderr.startswith("config error: data.path: ")
    assert len(result.stderr.splitlines()) == 1
    assert not run_dir.exists()


@pytest.mark.long  # ~80 s: a live training run held while the second launch is refused
def test_a_second_launch_on_a_live_run_directory_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    args = (f"run.output_dir={run_dir}", "run.num_epochs=60", "checkpoint.every_steps=50")
    first = subprocess.Popen(
        train_command("--config", QUICK_START, *args),
        cwd=REPO_ROOT,
        env=trainer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "config.yaml").exists():  # the first launch has started writing
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.2)
        started = time.monotonic()
        second = run(*args, "checkpoint.resume=auto", timeout=120)
        assert second.returncode == 2
        [line] = second.stderr.strip().splitlines()
        assert line.startswith(f"config error: run.output_dir: '{run_dir}' is in use by another")
        assert f"(pid {first.pid} on " in line
        assert time.monotonic() - started < 60  # refused at once, never a hang
        assert first.poll() is None  # the first launch is still training...
        assert first.wait(timeout=300) == 0  # ...and finishes untouched
    finally:
        first.kill()
        first.wait()
    assert (run_dir / "metrics.json").exists()
    # Its lock died with it: a relaunch continues the finished run (nothing left to train).
    again = run(*args, "checkpoint.resume=auto")
    assert again.returncode == 0, again.stderr[-2000:]


def test_a_corrupted_checkpoint_piece_is_one_line_and_exit_2(tmp_path):
    run_dir = tmp_path / "run"
    args = (f"run.output_dir={run_dir}", "run.num_epochs=2", "checkpoint.every_steps=5")
    assert run(*args).returncode == 0
    step_10 = run_dir / "checkpoints" / "step-10"
    piece = step_10 / "rank-00000.pt"
    data = bytearray(piece.read_bytes())
    data[-64:] = bytes(64)  # same size, inside the tensors: only the checksum can tell
    piece.write_bytes(bytes(data))
    os.utime(piece, ns=(0, 0))
    before = snapshot(run_dir)
    # Named explicitly, the damaged checkpoint is refused in one line; nothing is written.
    result = run(*args, f"checkpoint.resume={step_10}")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert str(step_10) in line and "rank-00000.pt" in line and "corrupt" in line, line
    assert snapshot(run_dir) == before
    # Under resume: auto the run says so and continues from the previous complete checkpoint.
    result = run(*args, "checkpoint.resume=auto")
    assert result.returncode == 0, result.stderr
    assert f"resuming from the previous complete checkpoint {run_dir}/checkpoints/step-5" in (
        result.stdout + result.stderr
    )
