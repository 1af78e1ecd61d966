"""Start the trainer the way users do: ``python -m tvlars_scale.train`` and ``accelerate launch``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests" / "distributed"))
from multiproc import free_port  # noqa: E402  (the suite's one free-port helper)

__all__ = [
    "REPO_ROOT",
    "accelerate_launcher",
    "free_port",
    "launch",
    "read_metrics",
    "train_command",
    "trainer_env",
]


def trainer_env() -> dict[str, str]:
    # Two cores shared by the whole suite: one thread per process avoids OpenMP oversubscription.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def accelerate_launcher(config_file: str, *options: str) -> tuple[str, ...]:
    """``accelerate launch`` options for a shipped launch file (``launch/NAME``) on a free port."""
    return (
        "--config_file",
        f"launch/{config_file}",
        *options,
        "--main_process_port",
        str(free_port()),
    )


def train_command(*train_args: str, launcher: tuple[str, ...] = ()) -> list[str]:
    """``python -m tvlars_scale.train ARGS``, or the same module under ``accelerate launch``."""
    if launcher:
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *launcher,
            "-m",
            "tvlars_scale.train",
            *train_args,
        ]
    return [sys.executable, "-m", "tvlars_scale.train", *train_args]


def launch(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run from the repository root (launch files name their DeepSpeed JSON relative to it)."""
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=trainer_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())
