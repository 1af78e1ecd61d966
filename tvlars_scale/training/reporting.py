"""What a run reports about its speed: model FLOPs and MFU, peak memory, data wait, a profiler trace.

* FLOPs: one forward and backward of the eager model on a meta-device batch, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions; element-wise ops are not
  counted, as in every MFU convention). Measured once, on meta tensors: no memory, no RNG draw, the
  model's buffers untouched. Per input sample of ``model(x)``: a Barlow Twins sample, two views,
  costs twice this.
* MFU: achieved model FLOP/s per device over the device's dense bf16 peak (:data:`PEAK_BF16_FLOPS`,
  by device name); ``"n/a"`` on the CPU or on a GPU not in the table.
* Peak memory: on CUDA ``peak_memory_allocated_mib`` / ``peak_memory_reserved_mib`` of this rank per
  log window (the peaks are reset at each window); on the CPU ``peak_memory_rss_mib``, the process's
  maximum resident set size so far (the kernel's ``ru_maxrss``: it cannot be reset per window).
* Data wait: the time the loop spends waiting for the next micro-batch over the time of its steps
  (``data_wait_fraction``). On CUDA a step's time is host time between launches, right on average
  over a window (each log line syncs) but not per step.
* ``run.profile``: a ``torch.profiler`` trace of optimizer steps ``[start_step, start_step +
  num_steps)`` written to ``<run dir>/profile/rank<r>.<time>.pt.trace.json`` (the files
  ``tensorboard_trace_handler`` writes: TensorBoard's profiler plugin, Perfetto, chrome://tracing).
"""

from __future__ import annotations

import resource
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tvlars_scale.batching import BatchPlan
from tvlars_scale.config import Config
from tvlars_scale.data import ImageData, StreamingData
from tvlars_scale.training.levers import graph_breaks

__all__ = ["PEAK_BF16_FLOPS", "RunReport", "TimedIterator", "peak_bf16_flops", "train_flops"]

PEAK_BF16_FLOPS = (
    # (substring of torch.cuda.get_device_name(), dense bf16 tensor FLOP/s), most specific first;
    # from NVIDIA's data sheets (without sparsity).
    ("GH200", 989.4e12),
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100 NVL", 835.0e12),
    ("H100", 989.4e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("B200", 2250.0e12),
    ("A100", 312.0e12),
    ("L40S", 362.1e12),
    ("L4", 121.0e12),
)
NOT_AVAILABLE = "n/a"
PROFILE_DIR = "profile"


def peak_bf16_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s; None on the CPU or for a GPU not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def train_flops(model: nn.Module, sample_shape: tuple[int, ...], batch: int = 2) -> float:
    """FLOPs of one forward and backward of ``model`` per sample of shape ``sample_shape``,
    counted on meta tensors (the model itself is neither run nor changed)."""
    params = {
        name: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad)
        for name, p in model.named_parameters()
    }
    buffers = {name: torch.empty_like(b, device="meta") for name, b in model.named_buffers()}
    inputs = torch.empty((batch, *sample_shape), device="meta")
    trained = [p for p in params.values() if p.requires_grad]
    with FlopCounterMode(display=False) as counter:
        output = torch.func.functional_call(model, {**params, **buffers}, (inputs,))
        output = output[0] if isinstance(output, tuple) else output
        if output.requires_grad:  # a frozen model (linear evaluation's backbone) has no backward
            torch.autograd.grad(output.float().sum(), trained, allow_unused=True)
    return counter.get_total_flops() / batch


class TimedIterator:
    """Wraps the loader's iterator; sums the seconds spent waiting in ``next``."""

    def __init__(self, iterator: Iterator, report: RunReport):
        self.iterator, self.report = iterator, report

    def __iter__(self) -> TimedIterator:
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.report.wait_seconds += time.perf_counter() - start


class RunReport:
    """FLOPs, MFU, memory, data wait and the profiler for one run (one per process)."""

    def __init__(
        self,
        model: nn.Module,
        data: ImageData | StreamingData,
        plan: BatchPlan,
        accelerator: Accelerator,
        config: Config,
        run_dir: Path,
    ):
        sample_shape = (data.in_chans, data.image_size, data.image_size)
        self.flops_per_sample = train_flops(model, sample_shape)
        self.device, self.num_processes = accelerator.device, accelerator.num_processes
        self.global_batch_size = plan.global_batch_size
        self.profile, self.profile_dir = config.run.profile, run_dir / PROFILE_DIR
        self.rank, self.print = accelerator.process_index, accelerator.print
        self.compiled = config.run.compile
        self.peak_flops = peak_bf16_flops(self.device)
        self.wait_seconds = self.step_seconds = 0.0  # in this window
        self.total_wait = self.total_step = 0.0
        self.run_peaks: dict[str, float] = {}
        self.num_steps = 0
        self._mark = time.perf_counter()
        self.profiler: torch.profiler.profile | None = None
        self._profiled = 0
        self._mfu_text_logged = False

    def timed(self, iterator: Iterator, step: int) -> TimedIterator:
        """The epoch's micro-batch iterator, timed; time before this call (evaluation, the epoch
        switch) counts as no step's."""
        self._mark = time.perf_counter()
        self._maybe_start_profile(step)
        return TimedIterator(iterator, self)

    def after_step(self, step: int) -> None:
        """After each optimizer step (``step``: the optimizer steps done so far)."""
        now = time.perf_counter()
        self.step_seconds += now - self._mark
        self._mark = now
        self.num_steps += 1
        if self.profiler is not None:
            self.profiler.step()
            self._profiled += 1
            if self._profiled >= self.profile.num_steps:
                self._stop_profile()
        else:
            self._maybe_start_profile(step)

    def window(self, samples_per_second: float) -> dict[str, float | str]:
        """The log window's values for the trackers; starts the next window."""
        values: dict[str, float | str] = {
            "data_wait_fraction": self.wait_seconds / self.step_seconds
            if self.step_seconds
            else 0.0,
            **self._memory(reset=True),
        }
        mfu = self._mfu(samples_per_second)
        if mfu != NOT_AVAILABLE or not self._mfu_text_logged:
            # "n/a" is no scalar: the trackers get it once, as text (TensorBoard's add_text).
            values["mfu"] = mfu
            self._mfu_text_logged = mfu == NOT_AVAILABLE
        self.total_wait += self.wait_seconds
        self.total_step += self.step_seconds
        self.wait_seconds = self.step_seconds = 0.0
        return values

    def summary(self) -> dict[str, float | str | int | dict]:
        """The whole run's values for metrics.json (steps since this process started); writes a
        profile that the end of the run cut short."""
        self.close()
        wait = self.total_wait + self.wait_seconds
        seconds = self.total_step + self.step_seconds
        samples_per_second = self.num_steps * self.global_batch_size / seconds if seconds else 0.0
        self._memory(reset=False)
        summary = {
            "model_flops_per_sample": self.flops_per_sample,
            "mfu": self._mfu(samples_per_second),
            "data_wait_fraction": wait / seconds if seconds else 0.0,
            **self.run_peaks,
        }
        if self.compiled:
            breaks = graph_breaks()
            summary["compile_graph_breaks"] = sum(breaks.values())
            if breaks:  # one line: the three commonest reasons; TORCH_LOGS=graph_breaks says where
                top = "; ".join(f"{count}x {reason}" for reason, count in list(breaks.items())[:3])
                more = f"; {len(breaks) - 3} more reasons" if len(breaks) > 3 else ""
                self.print(
                    f"torch.compile: {summary['compile_graph_breaks']} graph breaks ({top}{more}; "
                    "TORCH_LOGS=graph_breaks shows where)"
                )
            else:
                self.print("torch.compile: 0 graph breaks")
        return summary

    def _mfu(self, samples_per_second: float) -> float | str:
        if self.peak_flops is None or not samples_per_second:
            return NOT_AVAILABLE
        per_device = samples_per_second / self.num_processes
        return self.flops_per_sample * per_device / self.peak_flops

    def _memory(self, reset: bool) -> dict[str, float]:
        mib = 2.0**20
        if self.device.type == "cuda":
            peaks = {
                "peak_memory_allocated_mib": torch.cuda.max_memory_allocated(self.device) / mib,
                "peak_memory_reserved_mib": torch.cuda.max_memory_reserved(self.device) / mib,
            }
            if reset:
                torch.cuda.reset_peak_memory_stats(self.device)
        else:
            # ru_maxrss: KiB on Linux, bytes on macOS.
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peaks = {"peak_memory_rss_mib": rss / (mib if sys.platform == "darwin" else 1024.0)}
        for key, value in peaks.items():
            self.run_peaks[key] = max(self.run_peaks.get(key, 0.0), value)
        return peaks

    def _maybe_start_profile(self, step: int) -> None:
        if self.profile is None or self.profiler is not None or self._profiled:
            return
        if step != self.profile.start_step:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        # A schedule (all steps recorded, no warm-up: start_step says where) marks each step
        # as ProfilerStep#<n>, which the trace viewers use; the handler writes the trace file.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*warmup.*")
            schedule = torch.profiler.schedule(
                wait=0, warmup=0, active=self.profile.num_steps, repeat=1
            )
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=schedule,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(
                str(self.profile_dir), worker_name=f"rank{self.rank}"
            ),
            record_shapes=True,
        )
        self.profiler.start()

    def _stop_profile(self) -> None:
        self.profiler.stop()  # writes the trace, unless the schedule's last step did
        self.profiler = None

    def close(self) -> None:
        """Write a trace cut short by the end of the run."""
        if self.profiler is not None:
            self._stop_profile()
