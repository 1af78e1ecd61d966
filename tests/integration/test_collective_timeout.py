"""``run.collective_timeout_s`` reaches the process group Accelerate creates: a rank that hangs ends the
whole job after about that long, not after torch's default (30 min on gloo, 10 on NCCL). (Under
DeepSpeed Accelerate hands the same timeout to ``deepspeed.init_distributed``.)"""

from __future__ import annotations

import subprocess
import time

import pytest
from launching import REPO_ROOT, accelerate_launcher, train_command, trainer_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TIMEOUT_S = 5


def test_a_hung_rank_ends_the_job_after_the_collective_timeout():
    launcher = accelerate_launcher("accelerate_node.yaml", "--num_processes", "2")
    command = train_command(launcher=launcher)[:-2]  # accelerate launch OPTIONS, no -m module
    command += [str(REPO_ROOT / "tests/integration/timeout_worker.py"), "configs/digits.yaml"]
    start = time.monotonic()
    result = subprocess.run(
        [*command, str(TIMEOUT_S)],
        cwd=REPO_ROOT,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    waited = float(result.stdout.split("rank 0: barrier failed after ")[1].split(" s")[0])
    assert TIMEOUT_S <= waited < TIMEOUT_S + 10, result.stdout[-2000:]
    assert elapsed < 240  # the launcher ended the hung rank too (it would sleep an hour)
