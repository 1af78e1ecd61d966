"""What the trainer logs: loss and throughput windows, per-layer norms and trust-ratio summaries.

Per-layer statistics come from the layer-wise optimizers' telemetry (device tensors recorded by
``step()``); they reach the host only here, once per log interval.
"""

from __future__ import annotations

import statistics
import time

import torch
from accelerate import Accelerator
from accelerate.utils import reduce
from torch import Tensor

__all__ = [
    "LAYER_STATS_FILE",
    "LogWindow",
    "StatsByLayer",
    "adapted_layer_names",
    "main_process_layer_stats",
    "run_metrics",
    "trust_ratio_summary",
]

# per-layer norms per log step (read by tvlars_scale.paper.plots layers)
LAYER_STATS_FILE = "layer_stats.jsonl"

# layer name -> weight_norm / update_norm / trust_ratio of the last step
StatsByLayer = dict[str, dict[str, float]]


class LogWindow:
    """Loss and throughput since the last log line; device tensors until the log step."""

    def __init__(self, step: int):
        self.start_step, self.start_time = step, time.perf_counter()
        self.loss_sum: Tensor | None = None

    def add(self, loss: Tensor) -> None:
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss

    def exclude(self, seconds: float) -> None:
        """Time spent on something other than training (evaluation) does not count."""
        self.start_time += seconds

    def flush(self, step: int, global_batch_size: int) -> dict[str, float]:
        num_steps = step - self.start_step
        # collective: all_reduce(mean) of the window's summed loss over ranks.
        mean_loss = reduce(self.loss_sum.float(), reduction="mean")
        train_loss = (mean_loss / num_steps).item()  # host sync: once per log interval
        seconds = time.perf_counter() - self.start_time
        self.start_step, self.start_time, self.loss_sum = step, time.perf_counter(), None
        return {
            "train_loss": train_loss,
            "samples_per_second": num_steps * global_batch_size / seconds,
        }


def adapted_layer_names(optimizer: torch.optim.Optimizer) -> set[str]:
    """Names of the layers that get a trust ratio (the others are pinned to 1)."""
    names = set()
    for group in optimizer.param_groups:
        if not group.get("adapt", True):
            continue
        for name, param in zip(group["param_names"], group["params"], strict=True):
            if not (group.get("exclude_1d", True) and param.ndim <= 1):
                names.add(name)
    return names


def main_process_layer_stats(
    optimizer: torch.optim.Optimizer, accelerator: Accelerator
) -> StatsByLayer:
    """The last step's per-layer norms and trust ratios of every layer, on the main process (which
    writes them); ``{}`` on the others and for plain SGD.

    No collective: under ZeRO / FSDP2 the step's one norm all-reduce already gave every rank the
    whole-layer norms of every layer, and the optimizer records them all (a log step receives only
    the loss, whatever the world size and the layer count).
    """
    if not (accelerator.is_main_process and hasattr(optimizer, "layer_stats")):
        return {}
    return optimizer.layer_stats()  # host sync (inside layer_stats)


def trust_ratio_summary(stats: StatsByLayer, adapted_layers: set[str]) -> dict[str, float]:
    """min / median / max of the trust ratios of the adapted layers."""
    ratios = [s["trust_ratio"] for name, s in stats.items() if name in adapted_layers]
    if not ratios:
        return {}
    return {
        "trust_ratio/min": min(ratios),
        "trust_ratio/median": statistics.median(ratios),
        "trust_ratio/max": max(ratios),
    }


def run_metrics(history: list[dict], state, plan, lr: float, train_seconds: float) -> dict:
    """What metrics.json holds: every evaluation, the counters, throughput and the batch plan."""
    return {
        "final": history[-1] if history else {},
        "history": history,
        "num_steps": state.step,
        "num_epochs": state.epoch,
        "num_samples": state.num_samples,
        "num_skipped_steps": state.num_skipped_steps,
        "train_seconds": train_seconds,
        "samples_per_second": state.num_samples / train_seconds if train_seconds else 0.0,
        "effective_batch": plan.describe(),
        "global_batch_size": plan.global_batch_size,
        "micro_batch_size": plan.micro_batch_size,
        "grad_accum_steps": plan.grad_accum_steps,
        "world_size": plan.world_size,
        "lr": lr,
    }
