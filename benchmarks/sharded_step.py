"""Optimizer step of TVLARS under DeepSpeed ZeRO-2 on two ranks, against SGD under the same engine.

Two CPU ranks (gloo) train timm's resnet18 (11.7M parameters, 62 layers) under ZeRO-2 with the
two usual parameter groups, once with TVLARS bound by ``bind_zero`` and once with the named baseline
``torch.optim.SGD(momentum=0.9, nesterov=True)``, the two engines interleaved step by step so that
machine noise hits both alike. Per optimizer step it records, as the slower rank saw it:

* ``engine step``: ``engine.step()`` at the accumulation boundary -- what a training step pays for
  the optimizer: DeepSpeed's gradient-norm check, the client ``step()`` per parameter group and the
  all-gather of the updated partitions;
* ``client step``: the client optimizer's ``step()`` calls alone (the arithmetic on this rank's
  shard; TVLARS's includes its norm all-reduce);
* the bytes that collectives issued inside the client ``step()`` move: TVLARS's per-layer norm
  all-reduce (SGD issues none).

Targets: engine step at most 1.10x SGD's, at most 8 bytes per layer.

FSDP2 rows (:mod:`fsdp_step`, ``--engines`` names which run): the same resnet under PyTorch FSDP2
(``fully_shard``, DTensor ``Shard(0)``), the ``step()`` of TVLARS bound by ``bind_fsdp`` against
``torch.optim.SGD(nesterov)`` on the same FSDP2 model (target at most 1.10x) and against a
per-parameter DTensor-norm implementation of the same TVLARS update, with the collectives each
issues per step and how far the two TVLARS implementations end apart. Prints the tables, then one
JSON line. ``python benchmarks/sharded_step.py [--steps 20] [--model resnet18]`` (it starts its two ranks
with torchrun itself).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

WORLD_SIZE = 2
MICRO_BATCH_SIZE = 2
IMAGE_SIZE = 32  # the step time does not depend on the input; small images keep backward cheap
TARGET_RATIO = 1.10
TARGET_BYTES_PER_LAYER = 8


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per method")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--model", default="resnet18", help="a timm model name")
    parser.add_argument(
        "--engines", default="zero2,fsdp2", help="comma-separated: zero2, fsdp2 (default both)"
    )
    args = parser.parse_args(argv)
    engines = args.engines.split(",")
    if not engines or any(e not in ("zero2", "fsdp2") for e in engines):
        parser.error(f"--engines: {args.engines!r} is not a comma-separated list of zero2, fsdp2")
    args.engines = engines
    if args.steps < 1:
        parser.error("--steps: must be at least 1")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps: must be non-negative")
    return args


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"sharded_step.py: {message}", file=sys.stderr)
        sys.exit(2)


class StepProbe:
    """Times the client optimizer's ``step()`` calls and counts the bytes collectives move inside them."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.seconds = 0.0
        self.bytes = 0
        self._inside = False
        step = optimizer.step

        def timed_step(*args, **kwargs):
            start = time.perf_counter()
            self._inside = True
            try:
                return step(*args, **kwargs)
            finally:
                self._inside = False
                self.seconds += time.perf_counter() - start

        optimizer.step = timed_step  # DeepSpeed looks the method up on the instance at every step

    def count(self, tensor: torch.Tensor) -> None:
        if self._inside:
            self.bytes += tensor.numel() * tensor.element_size()

    def take(self) -> tuple[float, int]:
        taken = (self.seconds, self.bytes)
        self.seconds, self.bytes = 0.0, 0
        return taken


def build_engine(model_name: str, optimizer_name: str, template_state: dict):
    import deepspeed
    import timm

    from tvlars_scale.optim import TVLARS, layerwise_param_groups
    from tvlars_scale.optim.zero_layout import bind_zero

    model = timm.create_model(model_name, num_classes=1000)
    model.load_state_dict(template_state)
    groups = layerwise_param_groups(model, weight_decay=5e-4)
    if optimizer_name == "tvlars":
        optimizer = TVLARS(groups, lr=1.0)
    else:
        optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True)
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH_SIZE,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": True},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if optimizer_name == "tvlars":
        bind_zero(engine)
    return engine, StepProbe(optimizer)


def train_step(engine, probe: StepProbe, images, labels) -> tuple[float, float, int]:
    loss = F.cross_entropy(engine(images), labels)
    engine.backward(loss)
    start = time.perf_counter()
    engine.step()
    engine_seconds = time.perf_counter() - start
    client_seconds, client_bytes = probe.take()
    return engine_seconds, client_seconds, client_bytes


def rank_main(args: argparse.Namespace) -> None:
    import timm

    torch.set_num_threads(1)  # two ranks share the machine's cores
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    template = timm.create_model(args.model, num_classes=1000)
    num_params = sum(p.numel() for p in template.parameters())
    num_layers = sum(1 for _ in template.parameters())
    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(MICRO_BATCH_SIZE, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = torch.randint(0, 1000, (MICRO_BATCH_SIZE,), generator=generator)
    result = {
        "benchmark": "sharded_step",
        "model": args.model,
        "num_params": num_params,
        "num_layers": num_layers,
        "world_size": WORLD_SIZE,
        "steps": args.steps,
        "baseline": "torch.optim.SGD(momentum=0.9, nesterov=True)",
    }
    print_rank0 = print if rank == 0 else (lambda *a, **k: None)
    print_rank0(f"{args.model}: {num_params / 1e6:.1f}M parameters, {num_layers} layers")
    if "zero2" in args.engines:
        result.update(run_zero2(args, template, images, labels, num_layers, print_rank0))
    if "fsdp2" in args.engines:
        import fsdp_step

        fsdp = fsdp_step.run(args, template, images, labels)
        # collective: gathers each rank's timings once at the end
        gathered = [None] * WORLD_SIZE
        dist.all_gather_object(gathered, fsdp)
        result.update(report_fsdp2(gathered, num_layers, print_rank0))
    if rank == 0:
        print(json.dumps(result))
    dist.destroy_process_group()


def run_zero2(args, template, images, labels, num_layers: int, print_rank0) -> dict:
    rank = dist.get_rank()
    methods = ("sgd", "tvlars")
    engines = {name: build_engine(args.model, name, template.state_dict()) for name in methods}

    # Count what every all_reduce moves; the probes keep only what happens inside a client step().
    all_reduce = dist.all_reduce

    def counted_all_reduce(tensor, *rest, **kwargs):
        for _, probe in engines.values():
            probe.count(tensor)
        return all_reduce(tensor, *rest, **kwargs)

    dist.all_reduce = counted_all_reduce

    samples = {name: [] for name in methods}
    for step in range(args.warmup_steps + args.steps):
        for name in methods:  # interleaved: the same machine state for both
            sample = train_step(*engines[name], images, labels)
            if step >= args.warmup_steps:
                samples[name].append(sample)

    # collective: gathers each rank's timings once at the end; a step lasts as long as its slower rank
    gathered = [None] * WORLD_SIZE
    dist.all_gather_object(gathered, samples)
    dist.all_reduce = all_reduce
    return report(num_layers, gathered, print_rank0) if rank == 0 else {}


def report(num_layers: int, gathered: list[dict], print) -> dict:
    def median_ms(name: str, field: int) -> float:
        per_step = zip(*(rank_samples[name] for rank_samples in gathered), strict=True)
        return 1e3 * statistics.median(max(s[field] for s in step) for step in per_step)

    engine = {name: median_ms(name, 0) for name in ("sgd", "tvlars")}
    client = {name: median_ms(name, 1) for name in ("sgd", "tvlars")}
    norm_bytes = max(s[2] for s in gathered[0]["tvlars"])
    sgd_bytes = max(s[2] for s in gathered[0]["sgd"])
    engine_ratio = engine["tvlars"] / engine["sgd"]
    client_ratio = client["tvlars"] / client["sgd"]
    bytes_per_layer = norm_bytes / num_layers

    print(f"ZeRO-2 x {WORLD_SIZE}")
    print(f"{'median per optimizer step':<30}{'SGD':>10}{'TVLARS':>10}{'ratio':>8}")
    print(
        f"{'engine step (ms)':<30}{engine['sgd']:>10.1f}{engine['tvlars']:>10.1f}{engine_ratio:>8.3f}"
    )
    print(
        f"{'client step (ms)':<30}{client['sgd']:>10.1f}{client['tvlars']:>10.1f}{client_ratio:>8.3f}"
    )
    print(f"{'bytes all-reduced in step()':<30}{sgd_bytes:>10}{norm_bytes:>10}")
    print(f"{'  per layer':<30}{sgd_bytes / num_layers:>10.1f}{bytes_per_layer:>10.1f}")
    return {
        "zero_stage": 2,
        "sgd_engine_step_ms": round(engine["sgd"], 2),
        "tvlars_engine_step_ms": round(engine["tvlars"], 2),
        "engine_step_ratio": round(engine_ratio, 3),
        "sgd_client_step_ms": round(client["sgd"], 2),
        "tvlars_client_step_ms": round(client["tvlars"], 2),
        "client_step_ratio": round(client_ratio, 3),
        "norm_all_reduce_bytes_per_step": norm_bytes,
        "norm_all_reduce_bytes_per_layer": round(bytes_per_layer, 2),
        "meets_ratio_target": engine_ratio <= TARGET_RATIO,
        "meets_bytes_target": bytes_per_layer <= TARGET_BYTES_PER_LAYER,
    }


def report_fsdp2(gathered: list[dict], num_layers: int, print) -> dict:
    """The FSDP2 table and JSON fields: median step of the slower rank, collectives per step."""
    methods = ("sgd", "tvlars", "tvlars_dtensor")

    def median_ms(method: str) -> float:
        per_step = zip(*(g["samples"][method] for g in gathered), strict=True)
        return 1e3 * statistics.median(max(s[0] for s in step) for step in per_step)

    step_ms = {m: median_ms(m) for m in methods}
    collectives = {m: max(s[1] for g in gathered for s in g["samples"][m]) for m in methods}
    vs_sgd = step_ms["tvlars"] / step_ms["sgd"]
    vs_dtensor = step_ms["tvlars"] / step_ms["tvlars_dtensor"]
    print(f"FSDP2 x {WORLD_SIZE} (fully_shard, DTensor Shard(0))")
    print(f"{'median optimizer step()':<30}{'SGD':>10}{'TVLARS':>10}{'DTensor':>10}")
    print(
        f"{'step (ms)':<30}{step_ms['sgd']:>10.1f}{step_ms['tvlars']:>10.1f}"
        f"{step_ms['tvlars_dtensor']:>10.1f}"
    )
    print(f"{'TVLARS / that':<30}{vs_sgd:>10.3f}{1.0:>10.3f}{vs_dtensor:>10.3f}")
    print(
        f"{'collectives per step()':<30}{collectives['sgd']:>10}{collectives['tvlars']:>10}"
        f"{collectives['tvlars_dtensor']:>10}"
    )
    worst = max(g["tvlars_vs_dtensor"] for g in gathered)
    print(f"TVLARS (bound) vs per-parameter DTensor TVLARS after one step: {worst:.1e} relative")
    return {
        "fsdp2_dtensor_baseline": "TVLARS update with torch.linalg.vector_norm per DTensor parameter",
        "fsdp2_sgd_step_ms": round(step_ms["sgd"], 2),
        "fsdp2_tvlars_step_ms": round(step_ms["tvlars"], 2),
        "fsdp2_tvlars_dtensor_step_ms": round(step_ms["tvlars_dtensor"], 2),
        "fsdp2_step_ratio_vs_sgd": round(vs_sgd, 3),
        "fsdp2_step_ratio_vs_dtensor": round(vs_dtensor, 3),
        "fsdp2_sgd_collectives_per_step": collectives["sgd"],
        "fsdp2_tvlars_collectives_per_step": collectives["tvlars"],
        "fsdp2_tvlars_dtensor_collectives_per_step": collectives["tvlars_dtensor"],
        "fsdp2_num_layers": num_layers,
        "fsdp2_tvlars_vs_dtensor_rel_diff": worst,
        "fsdp2_meets_ratio_target": vs_sgd <= TARGET_RATIO,
    }


def launch_ranks(argv: list[str]) -> int:
    """Re-run this script under torchrun with two local ranks."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD_SIZE}",
        f"--master_port={port}",
        os.path.abspath(__file__),
        *argv,
    ]
    return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" not in os.environ:
        return launch_ranks(argv)
    rank_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
