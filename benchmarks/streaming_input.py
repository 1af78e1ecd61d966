"""Streaming ImageNet input: images/s against torchvision's usual recipe, and peak RSS vs dataset size.

Generates a tree of ImageNet-like JPEGs (``--images``, ~500 x 375 px, in a temporary directory) and
times one pass over it, decode + random-resized-crop(224) + flip, with the same number of worker
processes for

(a) this pipeline: :class:`~tvlars_scale.data.StreamingLoader` (DCT-scaled decode, crop and flip in
    uint8, whole micro batches per worker; normalisation is left to the device, as in training);
(b) torchvision ``ImageFolder`` + ``RandomResizedCrop(224)`` + ``RandomHorizontalFlip()`` +
    ``ToTensor()`` in a ``DataLoader`` with the same batch size and workers.

Rounds alternate a, b, a, b... so both see the same machine load; the medians are compared.

Memory: two ranks (two processes, each reading its half of the epoch with its own workers) run
over the tree and over a tree 10x larger made of hard links to the same files (10x the entries
of the index, labels and permutation; the bytes read per image are the same). Each rank's peak
RSS and its workers' largest peak RSS are measured (``getrusage``) for a full epoch of each tree;
``rss_ratio_10x`` is the larger of the two ratios over both ranks (full epochs: the 10x run also
reads 10x the images). ``rss_ratio_10x_same_images`` reads only the 1x epoch's number of images
from the 10x index.

    python benchmarks/streaming_input.py [--images 2000] [--workers 2] [--rounds 5]

Last line: JSON with ``ratio`` (a / b) and ``rss_ratio_10x``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tvlars_scale.data import StreamingLoader, Transform, open_streaming  # noqa: E402

NUM_CLASSES = 10


def make_tree(root: Path, num_images: int, seed: int = 0) -> None:
    """``num_images`` photo-like 500 x 375 JPEGs (some portrait) in NUM_CLASSES classes, + val."""
    rng = np.random.default_rng(seed)
    for index in range(num_images + NUM_CLASSES):
        split, label = ("val", index % NUM_CLASSES) if index < NUM_CLASSES else ("train", None)
        label = index % NUM_CLASSES if label is None else label
        folder = root / split / f"n{label:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        width, height = (500, 375) if index % 4 else (375, 500)
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
        noise = rng.integers(-12, 13, smooth.shape)
        pixels = np.clip(smooth.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{index:06d}.JPEG", quality=90)


def link_tree(source: Path, target: Path, copies: int) -> None:
    """``copies`` hard links of every file: a dataset ``copies`` times larger on the same bytes."""
    for path in source.rglob("*.JPEG"):
        folder = target / path.parent.relative_to(source)
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            os.link(path, folder / f"{path.stem}_{k}{path.suffix}")


def ours(
    root: Path, workers: int, batch: int, epoch: int, rank=0, world=1, max_batches=None
) -> int:
    data = open_streaming("imagenet", str(root), 224)
    loader = StreamingLoader(
        data.train, Transform(224, train=True, seed=0), batch, rank, world, num_workers=workers
    )
    loader.set_epoch(epoch)
    count = 0
    for index, (_, labels) in enumerate(loader):
        count += len(labels)
        if max_batches is not None and index + 1 == max_batches:
            break
    return count


def torchvision_baseline(root: Path, workers: int, batch: int) -> int:
    from torchvision import datasets, transforms

    recipe = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ]
    )
    dataset = datasets.ImageFolder(str(root / "train"), recipe)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True
    )
    return sum(len(labels) for _, labels in loader)


def rss_child(args) -> None:
    """One rank: read its share of one epoch, print its and its workers' peak RSS (MiB)."""
    count = ours(Path(args.root), args.workers, args.batch, 0, args.rank, 2, args.max_batches)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    # The peak can be the imports'; the RSS now (index, labels, permutation held) shows growth below it.
    now = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    result = {"rank": args.rank, "images": count, "rank_mib": own, "rank_now_mib": now}
    print(json.dumps({**result, "worker_mib": workers}))


def two_ranks_rss(
    root: Path, workers: int, batch: int, max_batches: int | None = None
) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, __file__, "--rss-child", "--root", str(root)]
    command += ["--workers", str(workers), "--batch", str(batch)]
    if max_batches is not None:
        command += ["--max-batches", str(max_batches)]
    ranks = [
        subprocess.Popen([*command, "--rank", str(r)], env=env, stdout=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in ranks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="training JPEGs to generate")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both pipelines")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--max-batches", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.rss_child:
        rss_child(args)
        return
    with tempfile.TemporaryDirectory(prefix="streaming_input_") as tmp:
        root, root10 = Path(tmp) / "x1", Path(tmp) / "x10"
        start = time.perf_counter()
        make_tree(root, args.images)
        link_tree(root, root10, 10)
        print(f"generated {args.images} JPEGs in {time.perf_counter() - start:.1f} s")
        rates: dict[str, list[float]] = {"ours": [], "torchvision": []}
        for round_index in range(args.rounds):  # interleaved: both see the same load
            for name in rates:
                start = time.perf_counter()
                if name == "ours":
                    count = ours(root, args.workers, args.batch, round_index)
                else:
                    count = torchvision_baseline(root, args.workers, args.batch)
                rates[name].append(count / (time.perf_counter() - start))
            print(
                f"round {round_index}: "
                + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items())
            )
        medians = {name: statistics.median(values) for name, values in rates.items()}
        ratio = medians["ours"] / medians["torchvision"]
        rss = {"1x": two_ranks_rss(root, args.workers, args.batch)}
        rss["10x"] = two_ranks_rss(root10, args.workers, args.batch)
        # The same number of images from the 10x index: the dataset size's effect alone.
        per_rank = rss["1x"][0]["images"] // args.batch
        rss["10x, 1x's images"] = two_ranks_rss(root10, args.workers, args.batch, per_rank)

    def ratio_of(key: str, scale: str) -> float:
        pairs = zip(rss["1x"], rss[scale], strict=True)
        return max(b[key] / a[key] for a, b in pairs)

    rank_ratio, worker_ratio = ratio_of("rank_mib", "10x"), ratio_of("worker_mib", "10x")
    print(
        f"\n| pipeline ({args.workers} workers, batch {args.batch}) | images/s (median of {args.rounds}) |"
    )
    print("|---|---|")
    print(f"| (a) StreamingLoader | {medians['ours']:.1f} |")
    print(f"| (b) torchvision ImageFolder + RRC + flip + ToTensor | {medians['torchvision']:.1f} |")
    print(f"| ratio a / b | {ratio:.2f} |\n")
    print(
        "| dataset | rank | images read | rank peak RSS MiB | rank RSS at end MiB | workers' peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|")
    for scale, ranks in rss.items():
        for r in ranks:
            print(
                f"| {scale} | {r['rank']} | {r['images']} | {r['rank_mib']:.0f} | "
                f"{r['rank_now_mib']:.0f} | {r['worker_mib']:.0f} |"
            )
    result = {
        "images": args.images,
        "workers": args.workers,
        "rounds": args.rounds,
        "ours_images_per_s": round(medians["ours"], 1),
        "torchvision_images_per_s": round(medians["torchvision"], 1),
        "ratio": round(ratio, 3),
        # Per round a / b, then the median: robust to load that drifts between rounds.
        "ratio_paired_median": round(
            statistics.median(
                a / b for a, b in zip(rates["ours"], rates["torchvision"], strict=True)
            ),
            3,
        ),
        "rss_mib": rss,
        "rss_ratio_10x_rank": round(rank_ratio, 3),
        "rss_ratio_10x_workers": round(worker_ratio, 3),
        "rss_ratio_10x_same_images": round(
            max(
                ratio_of("rank_mib", "10x, 1x's images"), ratio_of("worker_mib", "10x, 1x's images")
            ),
            3,
        ),
        "rss_ratio_10x": round(max(rank_ratio, worker_ratio), 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
