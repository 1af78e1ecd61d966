"""Input pipeline throughput: whole-batch augmentation vs. torchvision transforms in DataLoader workers.

Both pipelines turn the same CIFAR-shaped uint8 images (32x32x3) into normalised float batches with
random pad-4 crops and horizontal flips, one epoch per run:

- baseline: torchvision ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``ToTensor()``,
  ``Normalize`` per sample on PIL images (as ``torchvision.datasets.CIFAR10`` does) in a
  ``DataLoader`` with 2 persistent workers;
- batched: ``MicroBatchLoader`` + ``BatchAugment`` on the training device (here: the CPU), in the
  main process with ONE intra-op thread (``--threads``): one core against the baseline's two
  workers, and no OpenMP threads spinning against other processes on a shared machine (on this
  2-core box, 2 threads under load were 10x slower than 1).

Runs alternate between the two so machine load hits both alike; medians are reported.

    python benchmarks/input_pipeline.py [--num-samples 8192] [--batch-size 512] [--runs 7]
                                        [--threads 1] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tvlars_scale.data import BatchAugment, ImageData, MicroBatchLoader, load_image_data

TARGET_RATIO = 5.0


class PILImageDataset(Dataset):
    """HWC uint8 arrays -> transformed PIL images, one sample per call (torchvision's CIFAR10)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: T.Compose) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def baseline_loader(data: ImageData, batch_size: int, num_workers: int) -> DataLoader:
    transform = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(data.mean, data.std),
        ]
    )
    dataset = PILImageDataset(
        data.train_images.permute(0, 2, 3, 1).numpy(), data.train_labels.numpy(), transform
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=True,  # worker start-up is not what is compared
    )


def time_epoch(batches, to_model_input, device: torch.device) -> tuple[float, int]:
    """Seconds for one pass over ``batches`` and the number of samples that came out."""
    start = time.perf_counter()
    num_samples = 0
    for images, labels in batches:
        batch = to_model_input(images.to(device, non_blocking=True)), labels.to(device)
        num_samples += len(batch[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync: the clock stops when the last batch is ready
    return time.perf_counter() - start, num_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads, main process")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # DataLoader workers run single-threaded regardless
    device = torch.device(args.device)

    data = load_image_data("synthetic", num_synthetic=args.num_samples, image_size=32)
    baseline = baseline_loader(data, args.batch_size, args.num_workers)
    batched = MicroBatchLoader(data.train_images, data.train_labels, args.batch_size, 0, 1)
    augment = BatchAugment(data.mean, data.std, crop_padding=4, flip=True)

    def run_baseline() -> tuple[float, int]:
        return time_epoch(baseline, lambda images: images, device)

    def run_batched(epoch: int) -> tuple[float, int]:
        batched.set_epoch(epoch)
        return time_epoch(batched, augment, device)

    # Warm-up: worker start, allocator, first-call overheads.
    run_baseline()
    run_batched(0)
    rates: dict[str, list[float]] = {"torchvision DataLoader": [], "BatchAugment": []}
    for run in range(args.runs):
        for name, (seconds, count) in (
            ("torchvision DataLoader", run_baseline()),
            ("BatchAugment", run_batched(run + 1)),
        ):
            rates[name].append(count / seconds)

    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratio = medians["BatchAugment"] / medians["torchvision DataLoader"]
    workers = f"{args.num_workers} workers"
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    print(
        f"device {device}, {args.num_samples} samples 3x32x32 uint8, batch {args.batch_size}, "
        f"{args.runs} runs (median, min..max samples/s)"
    )
    print(f"{'pipeline':<34}{'median':>12}{'min':>12}{'max':>12}")
    for name, values in rates.items():
        label = (
            f"{name} ({workers})"
            if name.startswith("torchvision")
            else f"{name} (in-process, {threads})"
        )
        print(f"{label:<34}{medians[name]:>12.0f}{min(values):>12.0f}{max(values):>12.0f}")
    print(f"ratio BatchAugment / torchvision: {ratio:.1f}x (target >= {TARGET_RATIO:.0f}x)")
    result = {
        "benchmark": "input_pipeline",
        "device": str(device),
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "runs": args.runs,
        "num_workers": args.num_workers,
        "threads": args.threads,
        "baseline_samples_per_s": round(medians["torchvision DataLoader"]),
        "batched_samples_per_s": round(medians["BatchAugment"]),
        "ratio": round(ratio, 2),
        "target_ratio": TARGET_RATIO,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
