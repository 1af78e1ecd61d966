"""Optimizer step time on the parameters of timm's resnet50 (25.6M parameters, 161 tensors).

Compares TVLARS (multi-tensor and per-tensor paths) against two named baselines measured in the same run:
``torch.optim.SGD(momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True)`` and timm's ``Lars``.
Methods are interleaved round by round so that machine noise hits them alike; medians over all steps.
Prints a table, then one JSON line. ``python benchmarks/optimizer_step.py [--steps 12] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch
from timm.optim import Lars

from tvlars_scale.optim import TVLARS, layerwise_param_groups

# The bytes any momentum method must move per step: read w, g, buffer; write w, buffer.
MIN_PASSES = 5


def make_methods(model: torch.nn.Module) -> dict[str, callable]:
    def tvlars(foreach):
        return lambda m: TVLARS(layerwise_param_groups(m, 5e-4), lr=1.0, foreach=foreach)

    return {
        "tvlars_foreach": tvlars(True),
        "tvlars_loop": tvlars(False),
        "sgd_foreach": lambda m: torch.optim.SGD(
            m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True
        ),
        "timm_lars": lambda m: Lars(m.parameters(), lr=1.0, momentum=0.9, weight_decay=5e-4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per method per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    template = timm.create_model(args.model, num_classes=1000)
    num_params = sum(p.numel() for p in template.parameters())
    num_tensors = sum(1 for _ in template.parameters())
    runs = {}
    for name, factory in make_methods(template).items():
        model = timm.create_model(args.model, num_classes=1000)
        model.load_state_dict(template.state_dict())
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2
        optimizer = factory(model)
        optimizer.step()  # allocates the state; not timed
        runs[name] = (optimizer, [])

    for _ in range(args.rounds):
        for optimizer, times in runs.values():
            for _ in range(args.steps):
                start = time.perf_counter()
                optimizer.step()
                times.append(time.perf_counter() - start)

    medians = {name: statistics.median(times) for name, (_, times) in runs.items()}
    # The spread of the headline ratio across rounds shows how much of it is machine noise.
    timm_ratio_by_round = [
        statistics.median(ours) / statistics.median(theirs)
        for ours, theirs in zip(
            _rounds(runs["tvlars_foreach"][1], args.steps),
            _rounds(runs["timm_lars"][1], args.steps),
            strict=True,
        )
    ]
    bytes_per_step = MIN_PASSES * 4 * num_params
    print(
        f"{args.model}: {num_params / 1e6:.1f}M parameters in {num_tensors} tensors, "
        f"{torch.get_num_threads()} threads, {args.rounds} x {args.steps} steps per method"
    )
    print(f"{'method':<16}{'median ms':>12}{'vs sgd':>10}{'GB/s':>10}")
    for name, seconds in medians.items():
        print(
            f"{name:<16}{seconds * 1e3:>12.2f}{seconds / medians['sgd_foreach']:>10.3f}"
            f"{bytes_per_step / seconds / 1e9:>10.2f}"
        )
    print("GB/s counts the bytes a momentum update must move: read w, g, buffer; write w, buffer.")
    print(
        "tvlars_foreach / timm_lars by round: "
        + " ".join(f"{ratio:.3f}" for ratio in timm_ratio_by_round)
    )
    result = {
        "benchmark": "optimizer_step",
        "model": args.model,
        "num_params": num_params,
        "num_tensors": num_tensors,
        "threads": torch.get_num_threads(),
        "median_ms": {k: round(v * 1e3, 3) for k, v in medians.items()},
        "tvlars_foreach/sgd_foreach": round(medians["tvlars_foreach"] / medians["sgd_foreach"], 3),
        "tvlars_foreach/timm_lars": round(medians["tvlars_foreach"] / medians["timm_lars"], 3),
        "tvlars_foreach_GBps": round(bytes_per_step / medians["tvlars_foreach"] / 1e9, 2),
        "tvlars_foreach/timm_lars_range": [
            round(min(timm_ratio_by_round), 3),
            round(max(timm_ratio_by_round), 3),
        ],
    }
    print(json.dumps(result))


def _rounds(times: list[float], steps: int) -> list[list[float]]:
    return [times[i : i + steps] for i in range(0, len(times), steps)]


if __name__ == "__main__":
    main()
