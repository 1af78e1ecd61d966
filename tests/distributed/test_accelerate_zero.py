"""The shipped launch files work end to end: ``accelerate launch --config_file
launch/accelerate_zero{1,2,3}.yaml`` trains through Accelerate's DeepSpeed wrappers, ``bind_zero`` finds
the engine behind the optimizer Accelerate returns, and the result matches one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_training
import torch
from multiproc import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("accelerate_worker.py")
# One optimizer per stage: the launch path is what is under test here; test_zero_sharding.py runs
# every optimizer under every stage.
OPTIMIZER_BY_STAGE = {1: "lars", 2: "tvlars", 3: "lamb"}


# Stage 2 in the default run; stages 1 and 3 (~40 s each) with `pytest -m long`.
@pytest.mark.parametrize(
    "stage", [pytest.param(s, marks=() if s == 2 else pytest.mark.long) for s in OPTIMIZER_BY_STAGE]
)
def test_accelerate_launch_matches_one_process(stage, tmp_path):
    optimizer_name = OPTIMIZER_BY_STAGE[stage]
    output = tmp_path / "params.pt"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        f"launch/accelerate_zero{stage}.yaml",
        "--main_process_port",
        str(free_port()),
        str(WORKER),
        str(output),
        optimizer_name,
    ]
    # The yaml names its DeepSpeed JSON relative to the repository root, as the docs say to run it.
    completed = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    params = torch.load(output)
    error, layer = tiny_training.worst_relative_error(
        params, tiny_training.train_reference(optimizer_name)
    )
    assert error < 1e-5, f"ZeRO-{stage} via Accelerate: {layer} off by {error:.2e}"
