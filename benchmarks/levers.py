"""The throughput levers on this machine: a ResNet-50 training step, eager NCHW against
``model.channels_last``, ``run.compile`` and both, each compile whole-model and regional.

One training step = forward, cross-entropy, backward and an SGD step (momentum, foreach) on a
synthetic batch of ImageNet-shaped images at a small side (default 64 px: the CPU's budget). Every
variant starts from the same weights and is built with the trainer's own levers
(:mod:`tvlars_scale.training.levers`: NHWC weights and inputs; in-place ``torch.compile`` of the
whole model as one graph, or per residual block: the ``*_regional`` variants). Its first step (the
compile, for the compiled variants) is timed apart as the lever's cost, each compile in a fresh,
empty inductor cache (no variant reuses another's kernels, nor an earlier run's) after a warm-up
compile of a small net has taken the process's one-time costs; then the variants are interleaved
round by round, so that machine noise hits them alike, and the medians over all timed steps are
compared against eager NCHW, the named baseline.

Prints a table, then one JSON line with ``channels_last_ratio``, ``compile_ratio``, ``both_ratio``,
``compile_regional_ratio`` and ``both_regional_ratio`` (eager step time / lever step time: above 1
the lever is faster) and ``regional_compile_time_ratio`` (regional compile time / whole-model
compile time, without and with channels_last: below 1 regional compiles faster).
``nice -n 10 python benchmarks/levers.py [--size 64] [--batch 16] [--rounds 5] [--steps 2]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

import timm
import torch
import torch.nn.functional as F
from torch._inductor.utils import fresh_cache

from tvlars_scale.training.levers import compile_in_place, graph_breaks, to_channels_last

VARIANTS = {  # name -> (channels_last, compile: None, "regional" or "whole")
    "eager_nchw": (False, None),
    "channels_last": (True, None),
    "compile": (False, "whole"),
    "both": (True, "whole"),
    "compile_regional": (False, "regional"),
    "both_regional": (True, "regional"),
}


def make_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    template = timm.create_model(args.model, num_classes=1000)
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 1000, (args.batch,))
    steps, first_step, times = {}, {}, {}
    caches = tempfile.TemporaryDirectory(prefix="levers-inductor-")
    # The process's one-time compile costs (inductor's imports, the C++ toolchain's first start)
    # would go to whichever variant compiles first: a small conv net takes them beforehand.
    warm_up = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    warm_up.compile()
    with fresh_cache(dir=caches.name, delete=False):
        warm_up(images[:2]).sum().backward()
    for name, (channels_last, compiled) in VARIANTS.items():
        model = copy.deepcopy(template).train()
        if channels_last:
            to_channels_last(model)
        if compiled:
            compile_in_place(model, regional=compiled == "regional")
        steps[name] = make_step(model, images, labels)
        # The compile, for the compiled variants (not in the medians), from empty caches: PyTorch's
        # own helper for that clears the in-memory caches and points inductor at a new directory.
        with fresh_cache(dir=caches.name, delete=False):
            start = time.perf_counter()
            steps[name]()
            first_step[name] = time.perf_counter() - start
        times[name] = []
    for _ in range(args.rounds):
        for name, step in steps.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)

    medians = {name: statistics.median(values) for name, values in times.items()}
    eager = medians["eager_nchw"]
    print(
        f"{args.model} training step, batch {args.batch} x 3 x {args.size} x {args.size}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps"
    )
    print(f"{'variant':<15}{'median s':>10}{'images/s':>10}{'vs eager':>10}{'first step s':>14}")
    for name, median in medians.items():
        print(
            f"{name:<15}{median:>10.4f}{args.batch / median:>10.1f}{eager / median:>10.2f}"
            f"{first_step[name]:>14.1f}"
        )
    result = {
        "benchmark": "levers",
        "model": args.model,
        "image_size": args.size,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "median_step_seconds": {name: round(m, 5) for name, m in medians.items()},
        "first_step_seconds": {name: round(s, 2) for name, s in first_step.items()},
        "channels_last_ratio": round(eager / medians["channels_last"], 3),
        "compile_ratio": round(eager / medians["compile"], 3),
        "both_ratio": round(eager / medians["both"], 3),
        "compile_regional_ratio": round(eager / medians["compile_regional"], 3),
        "both_regional_ratio": round(eager / medians["both_regional"], 3),
        "regional_compile_time_ratio": [
            round(first_step["compile_regional"] / first_step["compile"], 2),
            round(first_step["both_regional"] / first_step["both"], 2),
        ],
        "graph_breaks": sum(graph_breaks().values()),
    }
    print(json.dumps(result))
    caches.cleanup()


if __name__ == "__main__":
    main()
