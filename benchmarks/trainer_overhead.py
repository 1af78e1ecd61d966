"""Trainer overhead: training samples/s of ``Trainer.train()`` against a bare Accelerate loop.

Baseline: the loop a user writes from Accelerate's examples (``accumulate``, ``backward``, ``step``,
``zero_grad``; nothing else) over the same model, data, augmentation, optimizer and learning rate,
for the same optimizer steps. The trainer runs as users run it: TensorBoard on, a log line every
``--log-every`` steps (loss reduced over ranks, lr, phi_t, per-layer trust ratios: host syncs),
the progress bar off (it only draws). Its samples/s is its own metrics.json figure, which excludes
the end-of-epoch evaluation. Rounds alternate trainer / bare so machine noise hits both alike;
medians over rounds. Target: trainer / bare >= 0.95.

Prints a table, then ONE JSON line. ``python benchmarks/trainer_overhead.py [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from tvlars_scale.config import Config, load_config
from tvlars_scale.data import BatchAugment, MicroBatchLoader, load_image_data
from tvlars_scale.models import build_model
from tvlars_scale.optim import build_optimizer
from tvlars_scale.trainer import Trainer

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_config(args: argparse.Namespace, output_dir: str) -> Config:
    return load_config(
        REPO_ROOT / "configs" / "digits.yaml",
        [
            f"run.output_dir={output_dir}",
            "run.overwrite=true",
            "run.num_epochs=1",
            f"run.log_every={args.log_every}",
            "run.progress_bar=false",
            "data.name=synthetic",
            f"data.image_size={args.image_size}",
            f"data.num_synthetic={args.global_batch_size * args.steps}",
            "data.crop_padding=4",
            "data.flip=true",
            f"model.name={args.model}",
            f"batch.global_batch_size={args.global_batch_size}",
            f"batch.micro_batch_size={args.micro_batch_size}",
            "optim.name=tvlars",
        ],
    )


def reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def trainer_samples_per_second(config: Config) -> float:
    trainer = Trainer(config)
    trainer.setup()
    metrics = trainer.train()
    trainer.close()
    reset_accelerate()
    return metrics["samples_per_second"]


def bare_samples_per_second(config: Config) -> float:
    """The same training, written directly against Accelerate."""
    accum = config.batch.global_batch_size // config.batch.micro_batch_size
    accelerator = Accelerator(gradient_accumulation_steps=accum)
    data = load_image_data(
        "synthetic", num_synthetic=config.data.num_synthetic, image_size=config.data.image_size
    )
    torch.manual_seed(config.run.seed)
    model = build_model(config.model.name, data.num_classes, data.in_chans, data.image_size)
    optimizer = build_optimizer(
        "tvlars", model, config.optim.lr, config.optim.weight_decay, lmbda=config.optim.lmbda
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    loader = MicroBatchLoader(
        data.train_images.to(device),
        data.train_labels.to(device),
        config.batch.micro_batch_size,
        rank=0,
        world_size=1,
        grad_accum_steps=accum,
    )
    augment = BatchAugment(data.mean, data.std, crop_padding=4, flip=True)
    model.train()
    started = time.perf_counter()
    for images, labels in loader:
        with accelerator.accumulate(model):
            loss = F.cross_entropy(model(augment(images)), labels)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()  # host sync: the last step's kernels are inside the timing
    seconds = time.perf_counter() - started
    accelerator.end_training()
    reset_accelerate()
    return len(loader) * config.batch.micro_batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--model", default="digits_cnn", help="any timm name (resnet18 on GPU)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--global-batch-size", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--output-dir", default="/tmp/tvlars_trainer_overhead")
    args = parser.parse_args()

    config = make_config(args, args.output_dir)
    # Warm-up (imports, allocator, kernels), not timed.
    trainer_samples_per_second(config)
    bare_samples_per_second(config)
    trainer_runs, bare_runs = [], []
    for _ in range(args.rounds):
        trainer_runs.append(trainer_samples_per_second(config))
        bare_runs.append(bare_samples_per_second(config))
    trainer_median, bare_median = statistics.median(trainer_runs), statistics.median(bare_runs)
    ratio = trainer_median / bare_median
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"device {device}, model {args.model}, {args.image_size}px, effective batch "
        f"{args.global_batch_size} = {args.micro_batch_size} micro x "
        f"{args.global_batch_size // args.micro_batch_size} accumulation, {args.steps} steps, "
        f"{args.rounds} rounds"
    )
    print(f"{'loop':<16} {'median samples/s':>17} {'runs':>40}")
    for name, runs, median in (
        ("bare accelerate", bare_runs, bare_median),
        ("Trainer", trainer_runs, trainer_median),
    ):
        print(f"{name:<16} {median:>17.1f} {' '.join(f'{r:.0f}' for r in runs):>40}")
    print(f"trainer / bare = {ratio:.3f} (target >= 0.95)")
    print(
        json.dumps(
            {
                "benchmark": "trainer_overhead",
                "device": device,
                "model": args.model,
                "global_batch_size": args.global_batch_size,
                "micro_batch_size": args.micro_batch_size,
                "trainer_samples_per_s": round(trainer_median, 1),
                "bare_samples_per_s": round(bare_median, 1),
                "ratio": round(ratio, 4),
                "meets_target": ratio >= 0.95,
            }
        )
    )


if __name__ == "__main__":
    main()
