"""One GPU check of tvlars_scale: correctness on CUDA, optimizer step speed, trainer throughput.

Prints a table, then ONE JSON line (also written to ``--out DIR/gpu_check.json``). Exit status 0
when nothing failed (skipped entries are not failures), 1 otherwise. Sized to finish in under 9
minutes on one H200 (estimated 5 to 7 minutes with the levers part; not yet run on one);
``--budget-s`` (default 520) bounds every subprocess it starts: a part that finds the budget spent
says ``skipped: time budget spent``.

THE COMMAND FOR A SESSION WITH A GPU (the device tool's ``run``, one call):

1. Here, where the package registry is reachable, once: ``bash launch/gpu_wheels.sh``. It fills
   ``.gpu_wheels/`` (about 5 MiB) with what the GPU machine's image lacks: DeepSpeed (pure Python,
   no compiled ops), hjson, pydantic (+ pydantic-core for CPython 3.12, annotated-types,
   typing-inspection, typing-extensions) and this package.
2. ``run`` with ``carry=[".gpu_wheels"]``, ``timeout_s=540`` and the command::

     set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu_wheels/*.whl && export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 && python3 benchmarks/gpu_check.py --out $OUT 2>&1 | tee $OUT/gpu_check.log

   ``$PWD`` comes first in PYTHONPATH, so the repository's own ``tvlars_scale`` (the tree that
   travelled) is what runs, never a stale wheel; the script refuses to run another copy.

What the GPU machine must have (the ``nvidia-h200`` image, per /work/.library/device/KINDS.md):
``python3`` = CPython 3.12 holding PyTorch with CUDA (seen: torch 2.11.0+cu130), torchvision,
timm, accelerate, transformers, scikit-learn, numpy, pyyaml, tqdm, tensorboard, matplotlib,
msgpack, ninja, psutil, py-cpuinfo, einops. It has no network, so nothing can be installed from a
registry there. If its ``python3`` lacks torch with CUDA, this check cannot run: torch (and its
CUDA libraries, several GiB) is far beyond the 64 MiB a call can carry. Wheels of the small
pure-Python packages above can be added to ``.gpu_wheels/`` by ``launch/gpu_wheels.sh`` (see its
EXTRA variable), within the 64 MiB.

On a machine without CUDA, or with ``--dry-run`` (which hides the GPU), every part runs at a tiny
size on the CPU; the CUDA-only checks then say ``skipped: no CUDA`` (never ``pass``), and timings are
marked as a CPU dry run (they show the code runs, they are not benchmarks).
``tests/integration/test_gpu_check.py`` runs it that way so that it cannot rot.

Parts (``--parts``):

* ``correctness``: (a) loop == foreach for TVLARS (paper and official variants, through
  ``tvlars_scale.optim.OPTIMIZERS``), LARS and LAMB: four steps on a CNN with conv, BN, linear
  and bias parameters, fp32 and bf16 parameters, both paths fed the same real gradients at every
  step (so only the update arithmetic is compared), bitwise or within ``assert_close``'s
  tolerances for the dtype (the entry says which); (b) CUDA only: ``step()`` of each (both
  paths, both dtypes) under ``torch.cuda.set_sync_debug_mode("error")`` after a warm-up step, with a
  control proving the detector fires on ``.item()``; (c) the digits quick start
  (``python -m tvlars_scale.train --config configs/digits.yaml``, Accelerate puts it on the GPU)
  SIGKILLed at a step boundary (``TVLARS_FAULT_KILL=boundary:n``) and resumed with
  ``checkpoint.resume=auto`` must equal the uninterrupted run BITWISE: every checkpoint written
  after the resume (model, trainer state, the rank file with optimizer state and RNG states, the
  CUDA generator included) and metrics.json (timings excluded). If it differs, a second
  uninterrupted run tells resume bugs from non-deterministic kernels.
* ``optimizer``: the parameters of timm's resnet50 (fp32) on the device; medians of per-step times
  (CUDA events on the GPU) over interleaved rounds of TVLARS foreach (and loop),
  ``SGD(momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True)``, ``SGD(fused=True)`` and
  timm's ``Lars``; achieved GB/s of the bytes a momentum update must move, against the measured
  device-to-device copy bandwidth. Reuses ``benchmarks/optimizer_step.py`` (its CPU version).
* ``trainer``: ResNet-18 on synthetic CIFAR-shaped data, global batch 16,384 through accumulation
  on one device, bf16 (``configs/cifar10_resnet18.yaml`` with ``data.name=synthetic``): the Trainer
  plain (Accelerate autocast, fp32 weights) and under DeepSpeed ZeRO-2 at world size 1 (bf16
  weights, fp32 master partition) against a bare PyTorch loop with the same model, micro batch,
  accumulation, augmentation, optimizer (TVLARS) and bf16 autocast; images/s from the median of
  device-synchronised steps after warm-up; and the input pipeline alone (micro-batch gather +
  augmentation, per optimizer step) against the step time. Each setting runs in a fresh process.
  The ZeRO-2 process gets the environment ``accelerate launch --config_file
  launch/accelerate_zero2.yaml --num_processes 1`` gives it (as tests/integration/test_resume.py
  starts its ranks).
* ``levers``: ResNet-50 through the Trainer at 224 px, bf16, batch 256 (one micro-batch per step):
  synthetic ImageNet-shaped data in memory with each lever on and off (eager NCHW,
  ``model.channels_last``, ``run.compile``, both), then a generated JPEG tree (random-noise JPEGs,
  320 px) streamed with CPU decode in 12 workers with both levers on, and where DALI is installed
  the same with ``data.decoder: dali`` (nvJPEG on the GPU; DALI's CPU pipeline in the dry run);
  images/s, the first step's time (the compile), MFU against the device's bf16 peak and the
  data-wait fraction (the trainer's own instrument); ``dali_vs_cpu_decode``: DALI images/s / CPU
  decode images/s. The DALI wheel (about 480 MB installed) is more than a device call carries,
  so where the GPU machine's image lacks it the DALI entry says skipped.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SKIPPED_NO_CUDA = "skipped: no CUDA"
PASS = "pass"
MEASURED = "measured"
DRY_MEASURED = "measured (dry run)"  # CPU, tiny sizes: shows the code runs, not a benchmark
# Timing keys of metrics.json: wall-clock (and memory peaks), legitimately different between two runs.
TIMING_KEYS = ("train_seconds", "samples_per_second", "mfu", "data_wait_fraction")
TIMING_KEYS += ("peak_memory_rss_mib", "peak_memory_allocated_mib", "peak_memory_reserved_mib")
LOOP_VS_FOREACH = "correctness/loop_vs_foreach"
NO_HOST_SYNC = "correctness/no_host_sync"
RESUME = "correctness/resume_bitwise"
OPTIMIZER_STEP = "optimizer_step"
TRAINER = "trainer_throughput"
LEVERS = "levers"
PART_ORDER = (LOOP_VS_FOREACH, NO_HOST_SYNC, RESUME, OPTIMIZER_STEP, TRAINER, LEVERS)


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU dry run."""

    # correctness
    check_channels: int
    check_steps: int
    digits_epochs: int
    digits_every_steps: int
    digits_kill_at: int  # TVLARS_FAULT_KILL=boundary:<n>; not a multiple of every_steps
    # optimizer step speed
    opt_model: str
    opt_rounds: int
    opt_steps: int
    copy_mib: int
    # trainer throughput
    image_size: int
    global_batch: int
    micro_batch: int
    warmup_steps: int
    timed_steps: int
    precision: str  # run.mixed_precision of every throughput setting
    # the levers (channels_last, compile, JPEG decode)
    lever_model: str
    lever_image: int
    lever_batch: int  # global = micro batch: one micro-batch per step
    lever_warmup: int  # the compile happens here
    lever_timed: int
    jpeg_side: int  # the generated JPEGs' side (the crop is lever_image)
    jpeg_workers: int  # data.num_workers of the streaming run


# digits: 1,437 training images / 256 = 5 optimizer steps per epoch.
GPU_SIZES = Sizes(
    check_channels=32,
    check_steps=4,
    digits_epochs=15,  # 75 steps
    digits_every_steps=10,
    digits_kill_at=33,  # killed after step 33: resumes from step 30
    opt_model="resnet50",
    opt_rounds=5,
    opt_steps=20,
    copy_mib=1024,
    image_size=32,
    global_batch=16384,
    micro_batch=1024,  # 16 micro-batches per step
    warmup_steps=2,
    timed_steps=6,
    precision="bf16",
    lever_model="resnet50",
    lever_image=224,
    lever_batch=256,
    lever_warmup=3,
    lever_timed=8,
    jpeg_side=320,
    jpeg_workers=12,
)
DRY_SIZES = Sizes(
    check_channels=8,
    check_steps=4,
    digits_epochs=2,  # 10 steps
    digits_every_steps=3,
    digits_kill_at=4,  # resumes from step 3
    opt_model="test_resnet",  # timm's 0.5M-parameter test ResNet
    opt_rounds=2,
    opt_steps=2,
    copy_mib=32,
    image_size=8,
    global_batch=32,
    micro_batch=8,
    warmup_steps=1,
    timed_steps=2,
    # fp32 on the CPU: bf16 autocast is slow there, and under DeepSpeed's bf16 (bf16 weights,
    # BatchNorm buffers left in fp32) the CPU batch norm refuses ResNet-18's mixed dtypes
    # ("expected scalar type BFloat16 but found Float"). The GPU run finds out whether CUDA's does.
    precision="no",
    lever_model="test_resnet",
    lever_image=32,
    lever_batch=8,
    lever_warmup=1,
    lever_timed=2,
    jpeg_side=40,
    jpeg_workers=1,
)


# --------------------------------------------------------------------------------------------
# Results


class Report:
    """Entries ``part/name -> {"status": ..., ...}``; the table and the JSON line come from it."""

    def __init__(self) -> None:
        self.entries: dict[str, dict] = {}

    def add(self, key: str, status: str, **details) -> None:
        self.entries[key] = {"status": status, **details}
        print(f"  {key}: {status}" + (f"  {_short(details)}" if details else ""), flush=True)

    def failed(self) -> list[str]:
        return [
            key
            for key, entry in self.entries.items()
            if entry["status"].startswith(("FAIL", "error"))
        ]

    def ordered(self) -> dict[str, dict]:
        """Entries by part (parts may finish in any order), each part's in insertion order."""

        def part(key: str) -> int:
            return next((i for i, p in enumerate(PART_ORDER) if key.startswith(p)), len(PART_ORDER))

        return dict(sorted(self.entries.items(), key=lambda item: part(item[0])))

    def skipped(self) -> list[str]:
        return [key for key, e in self.entries.items() if e["status"].startswith("skipped")]


def _short(details: dict, limit: int = 160) -> str:
    text = ", ".join(
        f"{k}={v}" for k, v in details.items() if not isinstance(v, (dict, list)) and k != "output"
    )
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _round(value, digits: int = 4):
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value


# --------------------------------------------------------------------------------------------
# 1. Correctness


def check_net(channels: int):
    from torch import nn

    class CheckNet(nn.Module):
        """conv (+bias) -> BN -> conv (no bias) -> BN -> pool -> linear (+bias)."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)
            self.fc = nn.Linear(channels * 4 * 4, 10)

        def forward(self, x):
            x = self.bn1(self.conv1(x)).relu()
            x = nn.functional.avg_pool2d(self.bn2(self.conv2(x)).relu(), 2)
            return self.fc(x.flatten(1))

    return CheckNet()


# Hyper-parameters that make every term move within four steps (phi_t decays, LAMB's moments grow).
OPTIMIZER_KWARGS = {
    "tvlars": {"lr": 3.0, "lmbda": 0.1, "delay_steps": 2},
    "tvlars_official": {"lr": 3.0, "lmbda": 0.1},
    "lars": {"lr": 3.0, "nesterov": True},
    "lamb": {"lr": 0.01, "weight_decay": 0.01},
}


def make_optimizer(name: str, model, foreach: bool):
    from tvlars_scale.optim import OPTIMIZERS, layerwise_param_groups

    groups = layerwise_param_groups(model, 5e-4)
    return OPTIMIZERS[name](groups, foreach=foreach, **OPTIMIZER_KWARGS[name])


def train_steps(model, optimizer, device, dtype, steps: int, seed: int = 0) -> None:
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 3, 8, 8, generator=generator).to(device, dtype)
        y = torch.randint(0, 10, (16,), generator=generator).to(device)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).float(), y).backward()
        optimizer.step()


def check_loop_vs_foreach(report: Report, device, sizes: Sizes) -> None:
    """Both paths step the same model from the same start with the SAME gradients at every step
    (computed on the foreach model, copied to the loop model), so what is compared is the update
    arithmetic alone, not how training amplifies a difference through later gradients."""
    import copy

    import torch
    import torch.nn.functional as F

    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        reference = check_net(sizes.check_channels).to(device, dtype)
        for name in OPTIMIZER_KWARGS:
            key = f"{LOOP_VS_FOREACH}/{name}/{dtype_name}"
            try:
                models = [copy.deepcopy(reference) for _ in range(2)]
                optimizers = [
                    make_optimizer(name, model, foreach)
                    for model, foreach in zip(models, (True, False), strict=True)
                ]
                generator = torch.Generator().manual_seed(0)
                for _ in range(sizes.check_steps):
                    x = torch.randn(16, 3, 8, 8, generator=generator).to(device, dtype)
                    y = torch.randint(0, 10, (16,), generator=generator).to(device)
                    for model in models:
                        model.zero_grad(set_to_none=True)
                    F.cross_entropy(models[0](x).float(), y).backward()
                    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
                        q.grad = p.grad.clone()
                    for optimizer in optimizers:
                        optimizer.step()
                params = [
                    {k: v.detach().cpu() for k, v in model.named_parameters()} for model in models
                ]
                initial = {k: v.detach().cpu() for k, v in reference.named_parameters()}
                moved = {k for k in initial if not torch.equal(params[0][k], initial[k])}
                max_ulps, bitwise, worst = 0.0, True, None
                eps = torch.finfo(dtype).eps
                far = []  # outside assert_close's tolerances for the dtype
                for k, a in params[0].items():
                    b = params[1][k]
                    bitwise &= torch.equal(a, b)
                    # Differences in units of the dtype's resolution at each value's magnitude.
                    diff = (a.double() - b.double()).abs()
                    ulps = float((diff / (a.double().abs().clamp_min(1e-30) * eps)).max())
                    if ulps > max_ulps:
                        max_ulps, worst = ulps, k
                    try:  # fp32: assert_close's fp32 tolerances; bf16: its bf16 ones
                        torch.testing.assert_close(a, b)
                    except AssertionError:
                        far.append(f"{k} (max |diff| {float(diff.max()):.3g})")
                details = {
                    "device": str(device),
                    "steps": sizes.check_steps,
                    "bitwise": bitwise,
                    "max_ulps": round(max_ulps, 2),
                    "worst": worst,
                }
                required = {"conv1.weight", "bn1.bias", "fc.bias"}
                if far:
                    report.add(key, f"FAIL: loop and foreach differ: {', '.join(far)}", **details)
                elif not required <= moved:
                    report.add(key, f"FAIL: parameters did not move: {sorted(required - moved)}")
                else:
                    note = "" if bitwise else " (within tolerance, not bitwise)"
                    report.add(key, PASS + note, **details)
            except Exception as error:  # a broken optimizer is a result
                report.add(key, f"error: {type(error).__name__}: {error}", device=str(device))


def check_no_host_sync(report: Report, device, sizes: Sizes) -> None:
    import torch

    keys = [
        f"{NO_HOST_SYNC}/{name}/{'foreach' if foreach else 'loop'}/{dtype}"
        for name in OPTIMIZER_KWARGS
        for foreach in (True, False)
        for dtype in ("fp32", "bf16")
    ]
    if device.type != "cuda":
        for key in keys:
            report.add(key, SKIPPED_NO_CUDA)
        report.add(f"{NO_HOST_SYNC}/detector_control", SKIPPED_NO_CUDA)
        return
    # Control: the detector must fire on a real sync, or a "pass" below would mean nothing.
    probe = torch.ones(4, device=device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        probe.sum().item()
        fired = False
    except RuntimeError:
        fired = True
    finally:
        torch.cuda.set_sync_debug_mode("default")
    report.add(
        f"{NO_HOST_SYNC}/detector_control",
        PASS if fired else "FAIL: .item() did not raise under set_sync_debug_mode('error')",
    )
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for key in keys:
        _, _, name, path, dtype_name = key.split("/")
        try:
            torch.manual_seed(0)
            model = check_net(sizes.check_channels).to(device, dtypes[dtype_name])
            optimizer = make_optimizer(name, model, path == "foreach")
            train_steps(model, optimizer, device, dtypes[dtype_name], 2)  # warm-up: state exists
            # Fresh gradients, computed outside the checked region.
            x = torch.randn(16, 3, 8, 8, device=device, dtype=dtypes[dtype_name])
            model(x).float().square().mean().backward()
            torch.cuda.synchronize()  # host sync: nothing pending enters the checked region
            torch.cuda.set_sync_debug_mode("error")
            try:
                optimizer.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()  # host sync: the step's kernels ran without error
            report.add(key, PASS)
        except RuntimeError as error:
            report.add(key, f"FAIL: {str(error).splitlines()[0]}")
        except Exception as error:  # reported, not raised
            report.add(key, f"error: {type(error).__name__}: {error}")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a trainer process started by hand: no launcher or fault variables of
    ours leak in; the repository comes first on the import path."""
    drop = ("TVLARS_FAULT_", "ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    path = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Deadline:
    """The whole check's time budget; every subprocess gets at most what is left of it."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def timeout(self, wanted: float, reserve: float = 10.0) -> float:
        return max(0.0, min(wanted, self.left() - reserve))


@dataclass
class Finished:
    returncode: int | None  # None: timed out (killed)
    output: str
    seconds: float


def run_processes(
    commands: list[tuple[list[str], dict[str, str]]], timeout: float
) -> list[Finished]:
    """Start every command at once (cwd: the repository), wait for all; kill what outlives timeout."""
    started = time.monotonic()
    results = []
    with contextlib.ExitStack() as stack:
        processes = []
        for command, env in commands:
            out = stack.enter_context(tempfile.TemporaryFile(mode="w+"))
            process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
            )
            processes.append((process, out))
        for process, out in processes:
            try:
                process.wait(timeout=max(0.0, timeout - (time.monotonic() - started)))
                code = process.returncode
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                code = None
            out.seek(0)
            results.append(Finished(code, out.read(), time.monotonic() - started))
    return results


def _tail(text: str, limit: int = 2000) -> str:
    return text[-limit:]


def _run_workers(
    report: Report, prefix: str, commands: dict, cuda: bool, deadline: Deadline, seconds
) -> dict[str, dict]:
    """Run the named worker commands and report each one's last JSON line (its result): on the GPU
    one at a time (they would share the card), on the CPU dry run all together. ``seconds``: the
    time a batch of workers gets (an int, or a function of the batch's size)."""
    results: dict[str, dict] = {}
    batches = [list(commands)] if not cuda else [[name] for name in commands]
    for names in batches:
        timeout = deadline.timeout(seconds(len(names)) if callable(seconds) else seconds)
        if timeout < 30:
            for name in names:
                report.add(f"{prefix}/{name}", "skipped: time budget spent")
            continue
        for name, finished in zip(
            names, run_processes([commands[n] for n in names], timeout), strict=True
        ):
            if finished.returncode != 0:
                status = (
                    "timed out" if finished.returncode is None else f"exit {finished.returncode}"
                )
                report.add(f"{prefix}/{name}", f"error: {status}", output=_tail(finished.output))
                continue
            results[name] = json.loads(finished.output.strip().splitlines()[-1])
            report.add(f"{prefix}/{name}", MEASURED if cuda else DRY_MEASURED, **results[name])
    return results


def nested_difference(a, b, where: str = "") -> str | None:
    """Where two checkpoint payloads first differ (bitwise), or None when they are equal."""
    import torch

    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return f"{where}: keys differ"
        for key in a:
            found = nested_difference(a[key], b[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return f"{where}: lengths differ"
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            found = nested_difference(x, y, f"{where}[{index}]")
            if found:
                return found
        return None
    if torch.is_tensor(a):
        if not torch.is_tensor(b) or a.dtype != b.dtype or a.shape != b.shape:
            return f"{where}: dtype or shape differ"
        if torch.equal(a, b):
            return None
        if a.is_floating_point():
            return f"{where}: differs by up to {float((a.double() - b.double()).abs().max()):.3g}"
        return f"{where}: differs"
    return None if a == b else f"{where}: {a!r} != {b!r}"


def compare_runs(run: Path, reference: Path, steps: list[int]) -> str | None:
    """First bitwise difference between two runs' checkpoints of ``steps`` and metrics.json."""
    from tvlars_scale.checkpoint.directory import CHECKPOINTS_DIR, load_file

    for step in steps:
        paths = [d / CHECKPOINTS_DIR / f"step-{step}" for d in (run, reference)]
        names = sorted(p.name for p in paths[1].iterdir() if p.suffix == ".pt")
        if sorted(p.name for p in paths[0].iterdir() if p.suffix == ".pt") != names:
            return f"step-{step}: different files"
        for name in names:
            found = nested_difference(load_file(paths[0], name), load_file(paths[1], name))
            if found:
                return f"step-{step}/{name}{found}"
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (run, reference)]
    for m in metrics:
        for key in TIMING_KEYS:
            m.pop(key, None)
    return nested_difference(metrics[0], metrics[1], "metrics.json")


def check_resume(report: Report, device, sizes: Sizes, workdir: Path, deadline: Deadline) -> None:
    """The digits quick start killed at a step boundary and resumed == the uninterrupted run."""
    from tvlars_scale.checkpoint.directory import CHECKPOINTS_DIR, complete_checkpoints, load_file

    key = f"{RESUME}/digits"
    steps_per_epoch = 1437 // 256
    total = steps_per_epoch * sizes.digits_epochs
    every, kill_at = sizes.digits_every_steps, sizes.digits_kill_at
    resumed_from = kill_at // every * every

    def command(run_dir: Path, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tvlars_scale.train",
            "--config",
            "configs/digits.yaml",
            f"run.output_dir={run_dir}",
            f"run.num_epochs={sizes.digits_epochs}",
            "run.progress_bar=false",
            f"checkpoint.every_steps={every}",
            "checkpoint.keep_last=1000",
            *extra,
        ]

    def steps_of(run_dir: Path) -> list[int]:
        return [c.step for c in complete_checkpoints(run_dir / CHECKPOINTS_DIR)]

    reference, faulty = workdir / "digits_reference", workdir / "digits_resumed"
    threads = {} if device.type == "cuda" else {"OMP_NUM_THREADS": "1"}
    timeout = deadline.timeout(240)
    if timeout < 30:
        report.add(key, "skipped: time budget spent")
        return
    # The uninterrupted run and the first (killed) leg run side by side: neither sees the other.
    first, killed = run_processes(
        [
            (command(reference), clean_env(threads)),
            (command(faulty), clean_env({**threads, "TVLARS_FAULT_KILL": f"boundary:{kill_at}"})),
        ],
        timeout,
    )
    if first.returncode != 0:
        report.add(
            key, f"error: uninterrupted run exit {first.returncode}", output=_tail(first.output)
        )
        return
    if killed.returncode != -9:
        report.add(
            key, f"error: the run to kill exited {killed.returncode}", output=_tail(killed.output)
        )
        return
    if steps_of(faulty)[-1:] != [resumed_from]:
        report.add(key, f"error: killed run's checkpoints are {steps_of(faulty)}")
        return
    (resumed,) = run_processes(
        [(command(faulty, "checkpoint.resume=auto"), clean_env(threads))], deadline.timeout(240)
    )
    if resumed.returncode != 0 or "resumed from" not in resumed.output:
        report.add(
            key, f"error: resumed run exit {resumed.returncode}", output=_tail(resumed.output)
        )
        return
    after = [s for s in steps_of(faulty) if s > resumed_from]
    if not after or after[-1] != total or any(s not in steps_of(reference) for s in after):
        report.add(key, f"error: checkpoints {steps_of(faulty)} vs {steps_of(reference)}")
        return
    rng = load_file(reference / CHECKPOINTS_DIR / f"step-{total}", "rank-00000.pt")["rng"]
    details = {
        "device": str(device),
        "steps": total,
        "killed_after_step": kill_at,
        "resumed_from_step": resumed_from,
        "compared_steps": after,
        "cuda_rng_in_checkpoint": rng.get("cuda") is not None,
        "seconds": round(first.seconds + resumed.seconds, 1),
    }
    if device.type == "cuda" and not details["cuda_rng_in_checkpoint"]:
        report.add(key, "FAIL: the checkpoint holds no CUDA random state", **details)
        return
    difference = compare_runs(faulty, reference, after)
    if difference is None:
        report.add(key, PASS, **details)
        return
    # Is it the resume, or are two uninterrupted runs already different on this device?
    control_dir = workdir / "digits_reference_again"
    control_note = "not run (time budget)"
    if deadline.timeout(240) > 60:
        (control,) = run_processes(
            [(command(control_dir), clean_env(threads))], deadline.timeout(240)
        )
        if control.returncode == 0:
            again = compare_runs(control_dir, reference, after)
            control_note = (
                "two uninterrupted runs are bitwise equal: the resume is at fault"
                if again is None
                else f"two uninterrupted runs differ too ({again}): non-deterministic kernels"
            )
        else:
            control_note = f"control run exit {control.returncode}"
    report.add(key, f"FAIL: {difference}", control=control_note, **details)


# --------------------------------------------------------------------------------------------
# 2. Optimizer step speed


def benchmark_optimizer_step(report: Report, device, sizes: Sizes) -> None:
    import timm
    import torch

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from optimizer_step import MIN_PASSES, _rounds, make_methods

    cuda = device.type == "cuda"
    timer = "cuda_events" if cuda else "perf_counter"
    measured = MEASURED if cuda else DRY_MEASURED
    prefix = OPTIMIZER_STEP

    copy_gbps = copy_bandwidth_gbps(device, sizes.copy_mib)
    report.add(
        f"{prefix}/copy_bandwidth",
        measured,
        device=str(device),
        mib=sizes.copy_mib,
        GBps=round(copy_gbps, 1),
        timer=timer,
    )

    methods = dict(make_methods(None))
    methods["sgd_fused"] = lambda m: torch.optim.SGD(
        m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True
    )
    torch.manual_seed(0)
    template = timm.create_model(sizes.opt_model, num_classes=1000)
    num_params = sum(p.numel() for p in template.parameters())
    num_tensors = sum(1 for _ in template.parameters())
    runs: dict[str, tuple] = {}
    for name, factory in methods.items():
        model = timm.create_model(sizes.opt_model, num_classes=1000)
        model.load_state_dict(template.state_dict())
        model.to(device)
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=generator) * 1e-2).to(device)
        try:
            optimizer = factory(model)
            optimizer.step()  # allocates the state; not timed
            optimizer.step()
        except Exception as error:  # e.g. fused SGD unsupported here
            report.add(f"{prefix}/{name}", f"skipped: {type(error).__name__}: {error}")
            continue
        runs[name] = (optimizer, [])
    # Rounds interleave the methods so that clock and machine noise hit them alike.
    for _ in range(sizes.opt_rounds):
        for optimizer, times in runs.values():
            times.extend(_call_times(optimizer.step, cuda, sizes.opt_steps))
    # GB/s counts the bytes any momentum update must move at least, 5 x 4 bytes per fp32
    # parameter (read w, g, momentum buffer; write w, buffer): MIN_PASSES of optimizer_step.py.
    # TVLARS' extra read of w and g for the per-layer norms is NOT counted, nor SGD's weight-decay
    # temporaries: achieved GB/s below the copy bandwidth is the price of such extra traffic and
    # of launch overhead.
    bytes_per_step = MIN_PASSES * 4 * num_params
    medians = {name: statistics.median(times) for name, (_, times) in runs.items()}
    for name, seconds in medians.items():
        gbps = bytes_per_step / seconds / 1e9
        vs_sgd = seconds / medians["sgd_foreach"] if "sgd_foreach" in medians else None
        report.add(
            f"{prefix}/{name}",
            measured,
            median_ms=round(seconds * 1e3, 3),
            vs_sgd_foreach=_round(vs_sgd) if vs_sgd else None,
            GBps=round(gbps, 1),
            fraction_of_copy=round(gbps / copy_gbps, 3),
        )
    summary = {
        "model": sizes.opt_model,
        "num_params": num_params,
        "num_tensors": num_tensors,
        "bytes_per_step": bytes_per_step,
        "rounds": sizes.opt_rounds,
        "steps_per_round": sizes.opt_steps,
        "timer": timer,
    }
    if {"tvlars_foreach", "timm_lars"} <= medians.keys():
        by_round = [
            statistics.median(ours) / statistics.median(theirs)
            for ours, theirs in zip(
                _rounds(runs["tvlars_foreach"][1], sizes.opt_steps),
                _rounds(runs["timm_lars"][1], sizes.opt_steps),
                strict=True,
            )
        ]
        summary["tvlars_foreach/timm_lars_by_round"] = [round(r, 3) for r in by_round]
    report.add(f"{prefix}/summary", measured, **summary)


def copy_bandwidth_gbps(device, mib: int) -> float:
    """Device-to-device ``copy_`` of a large fp32 tensor: it reads and writes every byte, so it
    moves 2 x its size per copy; median of 10 (the first one included)."""
    import torch

    numel = mib * 2**20 // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    seconds = _call_times(lambda: dst.copy_(src), device.type == "cuda", 10)
    return 2 * numel * 4 / statistics.median(seconds) / 1e9


def _call_times(fn: Callable[[], object], cuda: bool, calls: int) -> list[float]:
    """Seconds of each of ``calls`` back-to-back calls: CUDA events on the GPU, else wall clock."""
    import torch

    if not cuda:
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return times
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(calls)
    ]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()  # host sync: read the events once every call is done
    return [start.elapsed_time(end) / 1e3 for start, end in events]


# --------------------------------------------------------------------------------------------
# 3. Trainer throughput (each setting in a fresh process: this file's --worker mode)


def trainer_overrides(spec: dict) -> list[str]:
    steps = spec["warmup_steps"] + spec["timed_steps"]
    data = spec.get("data") or [
        "data.name=synthetic",
        f"data.image_size={spec['image_size']}",
        f"data.num_synthetic={spec['global_batch'] * steps}",
    ]
    return [
        f"run.output_dir={spec['output_dir']}",
        "run.overwrite=true",
        "run.num_epochs=1",
        "run.trackers=[]",
        "run.progress_bar=false",
        f"run.mixed_precision={spec['precision']}",
        *data,
        f"model.name={spec.get('model', 'resnet18')}",
        f"batch.global_batch_size={spec['global_batch']}",
        f"batch.micro_batch_size={spec['micro_batch']}",
        *spec.get("levers", []),
    ]


def worker(spec: dict) -> dict:
    """One throughput setting in this fresh process: ``trainer`` (plain or ZeRO-2) or ``bare``."""
    import torch

    from tvlars_scale.tasks import MicroBatches

    torch.backends.cudnn.benchmark = False  # as the trainer leaves it
    if spec["kind"] == "bare":
        step, loader, augment, device, accum = _bare_setup(spec)
    else:
        from tvlars_scale.config import load_config
        from tvlars_scale.trainer import Trainer

        config = load_config(
            REPO_ROOT / "configs" / "cifar10_resnet18.yaml", trainer_overrides(spec)
        )
        trainer = Trainer(config)
        trainer.setup()
        trainer.model.train()
        device, accum = trainer.accelerator.device, trainer.plan.grad_accum_steps
        loader, augment = trainer.train_loader, trainer.task.train_augment

        def step(batches):
            trainer.train_step(MicroBatches(batches, accum))

    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()  # host sync: the step's kernels finish inside the timing

    # The trainer's own instrument times the waits for input (the bare loop waits the same way).
    report = trainer.report if spec["kind"] != "bare" else None
    batches = report.timed(iter(loader), 0) if report else iter(loader)
    seconds, waits = [], []
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(spec["warmup_steps"] + spec["timed_steps"]):
        started, waited = time.perf_counter(), report.wait_seconds if report else 0.0
        step(batches)
        sync()
        seconds.append(time.perf_counter() - started)
        waits.append((report.wait_seconds if report else 0.0) - waited)
    timed = seconds[spec["warmup_steps"] :]
    # The input pipeline alone, per optimizer step: gather accum micro-batches from the on-device
    # dataset and augment them (pad-crop, flip, normalise), as the step does before its forwards.
    loader.start_at(0)
    batches = iter(loader)
    input_seconds = []
    for _ in range(spec["timed_steps"]):
        started = time.perf_counter()
        for _ in range(accum):
            images, _labels = next(batches)
            augment(images)
        sync()
        input_seconds.append(time.perf_counter() - started)
    step_median, input_median = statistics.median(timed), statistics.median(input_seconds)
    result = {
        "device": str(device),
        "grad_accum_steps": accum,
        "step_ms": [round(s * 1e3, 2) for s in seconds],
        "step_median_ms": round(step_median * 1e3, 2),
        "images_per_s": round(spec["global_batch"] / step_median, 1),
        "input_median_ms": round(input_median * 1e3, 2),
        "input_fraction_of_step": round(input_median / step_median, 4),
    }
    if cuda:
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if report:
        from tvlars_scale.training.reporting import peak_bf16_flops

        peak = peak_bf16_flops(device)
        images_per_s = spec["global_batch"] / step_median
        result["mfu"] = round(report.flops_per_sample * images_per_s / peak, 4) if peak else "n/a"
        result["data_wait_fraction"] = round(sum(waits[spec["warmup_steps"] :]) / sum(timed), 4)
        result["first_step_s"] = round(seconds[0], 2)  # the compile, for compiled settings
        result["distributed_type"] = str(trainer.accelerator.distributed_type)
        trainer.close()
    return result


def _bare_setup(spec: dict):
    """The bare PyTorch loop: same model, data, micro batch, accumulation, augmentation, optimizer
    and bf16 autocast as the plain trainer, and nothing else (no Accelerate, no NaN check)."""
    import torch
    import torch.nn.functional as F

    from tvlars_scale.data import BatchAugment, MicroBatchLoader, load_image_data
    from tvlars_scale.models import build_model
    from tvlars_scale.optim import TVLARS, layerwise_param_groups

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = spec["warmup_steps"] + spec["timed_steps"]
    accum = spec["global_batch"] // spec["micro_batch"]
    data = load_image_data(
        "synthetic", num_synthetic=spec["global_batch"] * steps, image_size=spec["image_size"]
    )
    torch.manual_seed(0)
    model = build_model("resnet18", data.num_classes, data.in_chans, data.image_size).to(device)
    model.train()
    optimizer = TVLARS(layerwise_param_groups(model, 5e-4), lr=1.0, weight_decay=5e-4, lmbda=1e-4)
    loader = MicroBatchLoader(
        data.train_images.to(device),
        data.train_labels.to(device),
        spec["micro_batch"],
        rank=0,
        world_size=1,
        grad_accum_steps=accum,
    )
    augment = BatchAugment(data.mean, data.std, crop_padding=4, flip=True)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if spec["precision"] == "bf16"
        else contextlib.nullcontext()
    )

    def step(batches):
        for _ in range(accum):
            images, labels = next(batches)
            with autocast:
                loss = F.cross_entropy(model(augment(images)), labels)
            (loss / accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, loader, augment, device, accum


def benchmark_trainer(
    report: Report, device, sizes: Sizes, workdir: Path, deadline: Deadline
) -> None:
    from tvlars_scale.batching import plan_batches

    prefix = TRAINER
    cuda = device.type == "cuda"
    plan = plan_batches(sizes.global_batch, sizes.micro_batch, 1)
    base = {
        "image_size": sizes.image_size,
        "global_batch": sizes.global_batch,
        "micro_batch": sizes.micro_batch,
        "warmup_steps": sizes.warmup_steps,
        "timed_steps": sizes.timed_steps,
        "precision": sizes.precision,
    }
    threads = {} if cuda else {"OMP_NUM_THREADS": "1"}
    zero2_env = {
        # What `accelerate launch --config_file launch/accelerate_zero2.yaml --num_processes 1`
        # sets for its one rank (launch/accelerate_zero2.yaml -> launch/deepspeed_zero2.json).
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO_ROOT / "launch" / "deepspeed_zero2.json"),
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
        "ACCELERATE_MIXED_PRECISION": "no",  # precision comes from run.mixed_precision
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "1",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
    }
    settings = {
        "bare": ({"kind": "bare"}, threads),
        "trainer_plain": ({"kind": "trainer"}, threads),
        "trainer_zero2": ({"kind": "trainer"}, {**threads, **zero2_env}),
    }
    commands = {}
    for name, (spec, env) in settings.items():
        spec = {**base, **spec, "output_dir": str(workdir / name)}
        command = [sys.executable, __file__, "--worker-spec", json.dumps(spec)]
        commands[name] = (command, clean_env(env))
    results = _run_workers(
        report, prefix, commands, cuda, deadline, lambda n: 180 * n if cuda else 240
    )
    summary = {
        "model": "resnet18",
        "image_size": sizes.image_size,
        "effective_batch": plan.describe(),
        "precision": sizes.precision,
        "timed_steps": sizes.timed_steps,
    }
    if "bare" in results:
        for name in ("trainer_plain", "trainer_zero2"):
            if name in results:
                summary[f"{name}/bare"] = round(
                    results[name]["images_per_s"] / results["bare"]["images_per_s"], 3
                )
    fractions = [r["input_fraction_of_step"] for r in results.values()]
    if fractions:
        summary["max_input_fraction_of_step"] = max(fractions)
        # The step runs its input pipeline inline (no overlap), so its share of the step bounds
        # what a faster pipeline could gain: under 10% it is not the bottleneck.
        summary["input_not_bottleneck"] = max(fractions) < 0.10
    report.add(f"{prefix}/summary", MEASURED if cuda else DRY_MEASURED, **summary)


def write_jpeg_tree(root: Path, num_train: int, side: int, num_classes: int = 4) -> Path:
    """An ImageNet-style folder of random-noise JPEGs (quality 90): root/{train,val}/<class>/."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", num_train), ("val", 2 * num_classes)):
        for index in range(count):
            folder = root / split / f"n{index % num_classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{split}_{index}.JPEG", quality=90)
    return root


def benchmark_levers(
    report: Report, device, sizes: Sizes, workdir: Path, deadline: Deadline
) -> None:
    """ResNet-50 images/s through the trainer with each lever on and off: synthetic ImageNet-shaped
    batches in memory (eager NCHW, channels_last, compile, both), then a generated JPEG tree
    streamed with CPU decode and, where DALI is installed, DALI decode (nvJPEG on the GPU), both
    levers on, for images/s and the data-wait fraction. MFU against the device's
    bf16 peak. Each setting in a fresh process (one at a time on the GPU)."""
    prefix = LEVERS
    cuda = device.type == "cuda"
    steps = sizes.lever_warmup + sizes.lever_timed
    base = {
        "kind": "trainer",
        "model": sizes.lever_model,
        "image_size": sizes.lever_image,
        "global_batch": sizes.lever_batch,
        "micro_batch": sizes.lever_batch,
        "warmup_steps": sizes.lever_warmup,
        "timed_steps": sizes.lever_timed,
        "precision": sizes.precision,
    }
    both = ["model.channels_last=true", "run.compile=true"]
    tree = write_jpeg_tree(workdir / "jpeg_tree", sizes.lever_batch * steps, sizes.jpeg_side)
    jpeg = [
        "data.name=imagenet",
        f"data.path={tree}",
        "data.storage=stream",
        f"data.image_size={sizes.lever_image}",
        f"data.num_workers={sizes.jpeg_workers}",
    ]
    settings = {
        "synthetic/eager_nchw": {},
        "synthetic/channels_last": {"levers": both[:1]},
        "synthetic/compile": {"levers": both[1:]},
        "synthetic/both": {"levers": both},
        "jpeg/both_cpu_decode": {"levers": both, "data": jpeg},
    }
    # GPU decode needs the optional DALI wheel (about 480 MB: more than a device call carries).
    dali = importlib.util.find_spec("nvidia.dali") is not None
    if dali:
        settings["jpeg/both_dali_decode"] = {"levers": both, "data": [*jpeg, "data.decoder=dali"]}
    threads = {} if cuda else {"OMP_NUM_THREADS": "1"}
    commands = {}
    for name, extra in settings.items():
        spec = {**base, **extra, "output_dir": str(workdir / "levers" / name.replace("/", "_"))}
        command = [sys.executable, __file__, "--worker-spec", json.dumps(spec)]
        commands[name] = (command, clean_env(threads))
    results = _run_workers(report, prefix, commands, cuda, deadline, 240 if cuda else 400)
    if not dali:
        report.add(
            f"{prefix}/jpeg/both_dali_decode",
            "skipped: DALI is not installed (pip install 'tvlars_scale[dali]')",
        )
    summary = {
        "model": sizes.lever_model,
        "image_size": sizes.lever_image,
        "batch": sizes.lever_batch,
    }
    eager = results.get("synthetic/eager_nchw")
    for lever in ("channels_last", "compile", "both"):
        if eager and f"synthetic/{lever}" in results:
            ratio = results[f"synthetic/{lever}"]["images_per_s"] / eager["images_per_s"]
            summary[f"{lever}_ratio"] = round(ratio, 3)
    for decoder in ("cpu", "dali"):
        if f"jpeg/both_{decoder}_decode" in results and "synthetic/both" in results:
            summary[f"jpeg_{decoder}_decode_vs_synthetic"] = round(
                results[f"jpeg/both_{decoder}_decode"]["images_per_s"]
                / results["synthetic/both"]["images_per_s"],
                3,
            )
    if "jpeg/both_cpu_decode" in results and "jpeg/both_dali_decode" in results:
        summary["dali_vs_cpu_decode"] = round(
            results["jpeg/both_dali_decode"]["images_per_s"]
            / results["jpeg/both_cpu_decode"]["images_per_s"],
            3,
        )
    report.add(f"{prefix}/summary", MEASURED if cuda else DRY_MEASURED, **summary)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------------------------


def print_table(report: Report) -> None:
    print()
    print(f"{'check':<58} {'status':<38} detail")
    for key, entry in report.ordered().items():
        details = {k: v for k, v in entry.items() if k != "status"}
        status = entry["status"]
        print(f"{key:<58} {status[:38]:<38} {_short(details, 110)}")
        if len(status) > 38:
            print(f"{'':<58} {status}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny sizes on the CPU (hides any GPU); automatic when CUDA is absent",
    )
    parser.add_argument(
        "--parts",
        default="correctness,optimizer,trainer,levers",
        help="comma-separated subset of correctness,optimizer,trainer,levers",
    )
    parser.add_argument("--out", type=Path, help="directory for gpu_check.json")
    parser.add_argument("--workdir", type=Path, help="run directories (default: a temporary one)")
    parser.add_argument("--budget-s", type=float, default=520.0, help="time for the whole check")
    parser.add_argument("--worker-spec", help=argparse.SUPPRESS)  # one throughput setting
    args = parser.parse_args()
    if args.worker_spec:
        print(json.dumps(worker(json.loads(args.worker_spec))))
        return 0
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: no GPU for anyone
    started = time.monotonic()
    deadline = Deadline(args.budget_s)

    import torch

    import tvlars_scale

    package_dir = Path(tvlars_scale.__file__).resolve().parent
    if package_dir != REPO_ROOT / "tvlars_scale":
        sys.exit(
            f"tvlars_scale is imported from {package_dir}, not from this repository: "
            f"put {REPO_ROOT} first in PYTHONPATH"
        )
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sizes = GPU_SIZES if cuda else DRY_SIZES
    parts = set(args.parts.split(","))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.workdir is None:
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    gpu = torch.cuda.get_device_name() if cuda else None
    print(
        f"gpu_check: device {device}{f' ({gpu})' if gpu else ''}, torch {torch.__version__}, "
        f"{'GPU sizes' if cuda else 'dry run: tiny sizes on the CPU, CUDA-only checks skipped'}; "
        f"run directories in {workdir}",
        flush=True,
    )
    report = Report()
    # (entry prefix, runs in this process?, function): in-process parts use the device here; the
    # others start processes and wait for them.
    jobs: list[tuple[str, bool, Callable[[], None]]] = []
    if "correctness" in parts:
        jobs += [
            (LOOP_VS_FOREACH, True, lambda: check_loop_vs_foreach(report, device, sizes)),
            (NO_HOST_SYNC, True, lambda: check_no_host_sync(report, device, sizes)),
        ]
    if "optimizer" in parts:
        jobs.append((OPTIMIZER_STEP, True, lambda: benchmark_optimizer_step(report, device, sizes)))
    if "correctness" in parts:
        jobs.append((RESUME, False, lambda: check_resume(report, device, sizes, workdir, deadline)))
    if "trainer" in parts:
        jobs.append(
            (TRAINER, False, lambda: benchmark_trainer(report, device, sizes, workdir, deadline))
        )
    if "levers" in parts:
        jobs.append(
            (LEVERS, False, lambda: benchmark_levers(report, device, sizes, workdir, deadline))
        )

    def run_job(prefix: str, job: Callable[[], None]) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {prefix}", flush=True)
        try:
            job()
        except Exception as error:  # one broken part hides no other
            report.add(f"{prefix}/part", f"error: {type(error).__name__}: {error}")
        if cuda:
            torch.cuda.empty_cache()

    if cuda:  # one after the other: no part's timing shares the card with another part
        for prefix, _, job in jobs:
            run_job(prefix, job)
    else:  # the CPU dry run times nothing that matters: the process-starting parts run alongside
        background = [
            threading.Thread(target=run_job, args=(prefix, job))
            for prefix, here, job in jobs
            if not here
        ]
        for thread in background:
            thread.start()
        for prefix, here, job in jobs:
            if here:
                run_job(prefix, job)
        for thread in background:
            thread.join()
    print_table(report)
    failed = report.failed()
    result = {
        "benchmark": "gpu_check",
        "device": str(device),
        "gpu": gpu,
        "dry_run": not cuda,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "sizes": asdict(sizes),
        "seconds": round(time.monotonic() - started, 1),
        "failed": failed,
        "skipped": report.skipped(),
        "all_passed": not failed,
        "entries": report.ordered(),
    }
    line = json.dumps(result)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(line + "\n")
    print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
