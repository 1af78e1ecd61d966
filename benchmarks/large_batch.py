"""Large effective batches by accumulation: peak memory stays flat, step time grows linearly.

The Trainer's ``train_step`` at a fixed micro batch with ``grad_accum_steps`` 1, 2, 4, 8, 16 (the
effective batch grows 16x). Each setting runs in a fresh process, so no allocator cache or
high-water mark carries over. Memory is the training working set: peak minus what was resident
before the first step (on CUDA ``max_memory_allocated``; on CPU the process RSS sampled every
0.5 ms by a thread). Baseline: accumulation 1 in the same run; the claim is peak(16) within 10% of
peak(1), and step time ~ a + b x accumulation (least squares; R^2 reported).

Prints a table, then ONE JSON line. ``python benchmarks/large_batch.py [--micro-batch-size 256]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Highest RSS seen by a sampling thread while active (CPU has no allocator peak counter)."""

    def __init__(self, interval_s: float = 5e-4):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def worker_env() -> dict[str, str]:
    # glibc raises its mmap threshold as large blocks are freed, after which freed activations stay
    # in the heap and RSS stops following live memory. A fixed threshold keeps every tensor above
    # 128 KiB in its own mapping, returned on free, so sampled RSS tracks the working set.
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def worker(args: argparse.Namespace) -> dict:
    """One accumulation setting, in this (fresh) process."""
    import torch

    from tvlars_scale.config import load_config
    from tvlars_scale.tasks import MicroBatches
    from tvlars_scale.trainer import Trainer

    global_batch = args.micro_batch_size * args.accum
    overrides = [
        f"run.output_dir={args.output_dir}/accum{args.accum}",
        "run.overwrite=true",
        "run.trackers=[]",
        "run.progress_bar=false",
        "data.name=synthetic",
        f"data.image_size={args.image_size}",
        f"data.num_synthetic={global_batch * args.steps}",
        f"model.name={args.model}",
        f"batch.global_batch_size={global_batch}",
        f"batch.micro_batch_size={args.micro_batch_size}",
        "optim.name=tvlars",
    ]
    trainer = Trainer(load_config(REPO_ROOT / "configs" / "digits.yaml", overrides))
    trainer.setup()
    cuda = trainer.accelerator.device.type == "cuda"
    batches = iter(trainer.train_loader)

    def step() -> float:
        started = time.perf_counter()
        trainer.train_step(MicroBatches(batches, trainer.plan.grad_accum_steps))
        if cuda:
            torch.cuda.synchronize()  # host sync: the step's kernels finish inside the timing
        return time.perf_counter() - started

    if cuda:
        torch.cuda.synchronize()  # host sync: setup done before the baseline is read
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        seconds = [step() for _ in range(args.steps)]
        peak = torch.cuda.max_memory_allocated()
    else:
        baseline = rss_bytes()
        with RssPeak() as sampler:
            seconds = [step() for _ in range(args.steps)]
        peak = sampler.peak
    trainer.close()
    return {
        "accum": args.accum,
        "global_batch_size": global_batch,
        "working_bytes": peak - baseline,
        "peak_bytes": peak,
        # The first step allocates the optimizer state and warms up kernels: not timed.
        "step_seconds": statistics.median(seconds[1:]),
        "device": str(trainer.accelerator.device),
    }


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b x``; returns (a, b, R^2)."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    a = mean_y - b * mean_x
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    return a, b, 1.0 - ss_res / ss_tot if ss_tot else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accums", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--micro-batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--model", default="digits_cnn", help="any timm name (resnet18 on GPU)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per setting")
    parser.add_argument("--output-dir", default="/tmp/tvlars_large_batch")
    parser.add_argument("--accum", type=int, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.accum is not None:
        print(json.dumps(worker(args)))
        return

    results = []
    for accum in args.accums:
        command = [sys.executable, __file__, *sys.argv[1:], "--accum", str(accum)]
        completed = subprocess.run(
            command, cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True, check=False
        )
        if completed.returncode:
            sys.exit(f"accumulation {accum} failed:\n{completed.stderr[-3000:]}")
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))

    reference = results[0]
    intercept, per_micro, r2 = linear_fit(
        [r["accum"] for r in results], [r["step_seconds"] for r in results]
    )
    print(
        f"device {reference['device']}, model {args.model}, micro batch {args.micro_batch_size}, "
        f"{args.image_size}px; baseline: accumulation {reference['accum']}"
    )
    print(
        f"{'accum':>5} {'batch':>7} {'working MB':>11} {'vs base':>8} {'step ms':>9} {'ms/micro':>9}"
    )
    for r in results:
        growth = r["working_bytes"] / reference["working_bytes"] - 1
        print(
            f"{r['accum']:>5} {r['global_batch_size']:>7} {r['working_bytes'] / 2**20:>11.1f} "
            f"{growth:>+8.1%} {r['step_seconds'] * 1e3:>9.1f} "
            f"{r['step_seconds'] * 1e3 / r['accum']:>9.2f}"
        )
    print(
        f"step time = {intercept * 1e3:.1f} ms + {per_micro * 1e3:.2f} ms x accumulation "
        f"(R^2 {r2:.4f})"
    )
    max_growth = max(r["working_bytes"] for r in results) / reference["working_bytes"] - 1
    print(
        json.dumps(
            {
                "benchmark": "large_batch",
                "device": reference["device"],
                "model": args.model,
                "micro_batch_size": args.micro_batch_size,
                "accums": [r["accum"] for r in results],
                "working_mb": [round(r["working_bytes"] / 2**20, 1) for r in results],
                "max_working_growth": round(max_growth, 4),
                "memory_flat_within_10pct": max_growth <= 0.10,
                "step_ms": [round(r["step_seconds"] * 1e3, 2) for r in results],
                "fit_intercept_ms": round(intercept * 1e3, 2),
                "fit_ms_per_micro_batch": round(per_micro * 1e3, 3),
                "fit_r2": round(r2, 5),
            }
        )
    )


if __name__ == "__main__":
    main()
