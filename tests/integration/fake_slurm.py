"""A fake SLURM on this machine: ``sbatch`` / ``srun`` / ``scontrol`` stubs on ``PATH`` that run the REAL
``launch/slurm.sbatch`` (and through it ``launch/slurm_node.sh`` and ``accelerate launch``) with every
"node" on the loopback, and deliver signals the way SLURM does.

* ``sbatch [--nodes=N] SCRIPT ARGS``: runs SCRIPT as the batch step at once (no queue) with the job's
  SLURM_* variables, its output appended to ``job.out`` (``--open-mode=append``); a requeue (the
  ``scontrol`` stub called with the job id, or a node failure the test declared) runs it again
  with the same job id and SLURM_RESTART_COUNT + 1, as slurmctld does.
* ``srun [options] CMD ARGS``: one task per node (SLURM_NODEID 0..N-1), output labelled ``N: ``; it
  forwards TERM / USR1 / INT to its tasks like srun; ``--kill-on-bad-exit=1``: a task that fails
  gets the whole step SIGKILLed (every process of every task, as the cgroup is).
* ``scontrol show hostnames`` lists 127.0.0.1 once per node; ``scontrol requeue ID`` is recorded.

:class:`FakeJob` submits a job and signals it like ``proctrack/cgroup`` (:meth:`FakeJob.signal_tasks`:
SIGUSR1 to each step task only, as ``--signal=USR1@300`` does) and like a time limit
(:meth:`FakeJob.signal_everything`: SIGTERM to every process of the job).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from launching import REPO_ROOT, free_port, trainer_env

__all__ = ["FakeJob", "install_stubs"]

_SRUN = r"""
import os, signal, subprocess, sys, threading, time
import psutil

args = sys.argv[1:]
options = {}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    options[key] = value
state = os.environ["FAKE_SLURM_DIR"]
tasks = []
for node in range(int(os.environ["SLURM_NNODES"])):
    env = {**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node), "SLURM_LOCALID": "0"}
    tasks.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
with open(os.path.join(state, "tasks"), "w") as file:
    file.write("".join(f"{task.pid}\n" for task in tasks))

def label(node, stream):
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(f"{node}: ".encode() + line)
        sys.stdout.flush()

readers = [threading.Thread(target=label, args=(n, t.stdout)) for n, t in enumerate(tasks)]
for reader in readers:
    reader.start()

def forward(signum, frame):
    for task in tasks:
        if task.poll() is None:
            task.send_signal(signum)

for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    signal.signal(signum, forward)

def kill_step():
    procs = []
    for task in tasks:
        try:
            procs += [psutil.Process(task.pid), *psutil.Process(task.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass

while any(task.poll() is None for task in tasks):
    if options.get("kill-on-bad-exit") == "1" and any(task.poll() for task in tasks):
        kill_step()
    time.sleep(0.2)
for reader in readers:
    reader.join()
codes = [128 - task.returncode if task.returncode < 0 else task.returncode for task in tasks]
sys.exit(max(codes))
"""

_SCONTROL = r"""
import os, sys

state = os.environ["FAKE_SLURM_DIR"]
if os.path.exists(os.path.join(state, "scontrol-fails")):
    sys.exit("scontrol: error: Unable to contact slurm controller (connect failure)")
with open(os.path.join(state, "scontrol.log"), "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    print("\n".join(["127.0.0.1"] * int(os.environ["SLURM_NNODES"])))
elif sys.argv[1] != "requeue":
    sys.exit(f"scontrol stub: {sys.argv[1:]} not faked")
"""

_SBATCH = r"""
import os, subprocess, sys

args = sys.argv[1:]
nodes = 2
while args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    if key == "nodes":
        nodes = int(value)
state = os.environ["FAKE_SLURM_DIR"]
job_id = os.environ["FAKE_SLURM_JOB_ID"]
log = os.path.join(state, "scontrol.log")
restarts = 0
while True:
    env = {
        **os.environ,
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NAME": "tvlars",
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NODELIST": f"node[0-{nodes - 1}]",
        "SLURM_SUBMIT_DIR": os.getcwd(),
        "SLURM_CPUS_PER_TASK": "1",
        "SLURM_RESTART_COUNT": str(restarts),
    }
    requeues = open(log).read().count(f"requeue {job_id}\n") if os.path.exists(log) else 0
    with open(os.path.join(state, "job.out"), "ab") as out:
        batch = subprocess.Popen(["bash", *args], env=env, stdout=out, stderr=subprocess.STDOUT)
        with open(os.path.join(state, "batch"), "w") as file:
            file.write(f"{batch.pid}\n")
        status = batch.wait()
    requeued = open(log).read().count(f"requeue {job_id}\n") > requeues if os.path.exists(log) else False
    failed_node = os.path.join(state, "node-failed")
    if os.path.exists(failed_node):  # slurmctld requeues a job whose node failed (--requeue)
        os.remove(failed_node)
        requeued = True
    with open(os.path.join(state, "runs"), "a") as file:
        file.write(f"{restarts} {status} {'requeued' if requeued else 'done'}\n")
    if not requeued or restarts == 3:
        sys.exit(status)
    restarts += 1
"""


def install_stubs(directory: Path) -> Path:
    """Write the three stubs into ``directory/bin``; returns that folder (to put first on PATH)."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(parents=True)
    for name, body in (("srun", _SRUN), ("scontrol", _SCONTROL), ("sbatch", _SBATCH)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)
    return bin_dir


class FakeJob:
    """One ``sbatch launch/slurm.sbatch CONFIG ARGS`` on the fake SLURM, started in the background."""

    def __init__(self, directory: Path, config: Path, *overrides: str, nodes: int = 2, **env: str):
        self.state = directory
        self.job_id = str(free_port())  # any number; the script derives its port from it
        bin_dir = install_stubs(directory)
        self.env = {
            **trainer_env(),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "FAKE_SLURM_DIR": str(directory),
            "FAKE_SLURM_JOB_ID": self.job_id,
            "ACCELERATE": str(Path(sys.executable).parent / "accelerate"),
            "PROCS_PER_NODE": "1",
            "MASTER_PORT": str(free_port()),
            "TVLARS_STOP_MARKER": str(directory / "stopped"),
            **env,
        }
        self.env = {
            k: v for k, v in self.env.items() if not k.startswith(("SLURM_", "TVLARS_FAULT_"))
        }
        command = ["sbatch", f"--nodes={nodes}", "launch/slurm.sbatch", str(config), *overrides]
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=self.env)

    def wait(self, timeout: float = 1800) -> int:  # two launches on a loaded 2-core machine
        return self.process.wait(timeout)

    @property
    def output(self) -> str:
        path = self.state / "job.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def runs(self) -> list[str]:
        """One line per run of the batch script: ``RESTART_COUNT STATUS requeued|done``."""
        return (self.state / "runs").read_text().splitlines()

    def scontrol_calls(self) -> list[str]:
        return (self.state / "scontrol.log").read_text().splitlines()

    def wait_for(self, path: Path, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert self.process.poll() is None, (
                f"the job ended before {path}:\n{self.output[-4000:]}"
            )
            assert time.monotonic() < deadline, (
                f"no {path} after {timeout} s:\n{self.output[-4000:]}"
            )
            time.sleep(0.2)

    def _pids(self, name: str) -> list[int]:
        return [int(line) for line in (self.state / name).read_text().split()]

    def signal_tasks(self, signum: int) -> None:
        """proctrack/cgroup: a signal to a job step reaches each task process, nothing else."""
        for pid in self._pids("tasks"):
            os.kill(pid, signum)

    def signal_everything(self, signum: int) -> None:
        """A time limit: every process of the job (batch script, srun, tasks, agents, ranks, workers)."""
        batch = psutil.Process(self._pids("batch")[0])
        for proc in [batch, *batch.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signum)

    def fail_node(self, node: int, requeue: bool = True) -> None:
        """The node dies: every process of its task, SIGKILLed; slurmctld requeues the job, or
        (``requeue=False``: a job submitted with ``--no-kill``) lets it go on without the node."""
        if requeue:
            (self.state / "node-failed").touch()
        task = psutil.Process(self._pids("tasks")[node])
        for proc in [task, *task.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
