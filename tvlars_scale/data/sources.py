"""Dataset names -> decoded uint8 tensors.

Every dataset is decoded ONCE into ``uint8`` tensors ``[N, C, H, W]`` on the CPU. Augmentation then
runs on whole batches on the training device (:mod:`tvlars_scale.data.augment`), so no per-sample
Python, PIL or worker process is on the training path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tvlars_scale.data.idx import has_idx_files, load_idx_dir
from tvlars_scale.data.types import DataError, DatasetInfo, ImageData

DATASETS: dict[str, DatasetInfo] = {
    # scikit-learn ships the 1,797 8x8 UCI digits inside the wheel: real data, no download.
    "digits": DatasetInfo(num_classes=10, image_size=8, in_chans=1),
    # Zalando's 28x28 grayscale Fashion-MNIST: a directory of its four IDX files (Debian's
    # dataset-fashion-mnist package, launch/get_fashion_mnist.sh) or the hub.
    "fashion-mnist": DatasetInfo(
        num_classes=10, image_size=28, in_chans=1, hub_id="zalando-datasets/fashion_mnist"
    ),
    "cifar10": DatasetInfo(num_classes=10, image_size=32, in_chans=3, hub_id="uoft-cs/cifar10"),
    "tiny-imagenet": DatasetInfo(
        num_classes=200, image_size=64, in_chans=3, hub_id="zh-plus/tiny-imagenet"
    ),
    # ImageNet-1k: streamed from disk (tvlars_scale.data.streaming); 224 is the training crop.
    "imagenet": DatasetInfo(
        num_classes=1000, image_size=224, in_chans=3, hub_id="ILSVRC/imagenet-1k"
    ),
    "synthetic": DatasetInfo(num_classes=10, image_size=32, in_chans=3),
}

DIGITS_TEST_FRACTION = 0.2
# The digits split is fixed, independent of the run seed, so accuracies of different seeds and
# configs are measured on the same 360 test images.
DIGITS_SPLIT_SEED = 0
DIGITS_MAX_VALUE = 16  # sklearn's digits are counts of set pixels in 4x4 blocks: 0..16


def load_image_data(
    name: str,
    path: str | None = None,
    num_synthetic: int = 16384,
    image_size: int | None = None,
    seed: int = 0,
) -> ImageData:
    """Load dataset ``name`` (a key of :data:`DATASETS`) as decoded uint8 tensors.

    Args:
        name: ``digits``, ``fashion-mnist``, ``cifar10``, ``tiny-imagenet`` or ``synthetic``.
        path: for ``fashion-mnist`` / ``cifar10`` / ``tiny-imagenet``: a Hugging Face hub id or a
            local directory (a ``save_to_disk`` directory or a folder ``datasets.load_dataset``
            understands, such as an image-folder tree ``train/<class>/*.png`` +
            ``test/<class>/*.png``; for ``fashion-mnist`` also a directory of the four IDX files,
            gzipped or not). None uses the default hub id. Ignored by ``digits`` and ``synthetic``.
        num_synthetic: training images of ``synthetic`` (its test split has a tenth as many).
        image_size: resize to this side length; None keeps the native size.
        seed: seeds ``synthetic``'s images and labels; the other datasets do not depend on it.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}")
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
    info = DATASETS[name]
    if name == "digits":
        train_x, train_y, test_x, test_y = _load_digits()
        num_classes = info.num_classes
    elif name == "synthetic":
        side = image_size or info.image_size
        train_x, train_y, test_x, test_y = _make_synthetic(info, num_synthetic, side, seed)
        num_classes = info.num_classes
    elif name == "fashion-mnist" and path is not None and has_idx_files(path):
        train_x, train_y, test_x, test_y = load_idx_dir(name, path)
        num_classes = info.num_classes
    else:
        # Imported here: `datasets` costs ~1 s to import and digits/synthetic runs never need it.
        from tvlars_scale.data.hub import load_hub_images

        source = path or info.hub_id
        split = load_hub_images(name, source, info.in_chans, image_size or info.image_size)
        train_x, train_y, test_x, test_y, num_classes = split
    if image_size is not None and train_x.shape[-1] != image_size:
        train_x, test_x = resize_uint8(train_x, image_size), resize_uint8(test_x, image_size)
    mean, std = channel_mean_std(train_x)
    return ImageData(train_x, train_y, test_x, test_y, num_classes, mean, std, name)


def _load_digits() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).mul(255 / DIGITS_MAX_VALUE).round().to(torch.uint8)
    images = images.unsqueeze(1)  # [N, 1, 8, 8]
    labels = torch.from_numpy(digits.target).to(torch.int64)
    # Stratified, so every class keeps its share in the small (360 image) test split.
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=labels.numpy(),
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def _make_synthetic(
    info: DatasetInfo, num_train: int, side: int, seed: int
) -> tuple[torch.Tensor, ...]:
    if num_train < 1:
        raise DataError(f"num_synthetic must be a positive number of images, got {num_train}")
    generator = torch.Generator().manual_seed(seed)
    num_test = max(1, num_train // 10)
    total = num_train + num_test
    images = torch.randint(
        0, 256, (total, info.in_chans, side, side), dtype=torch.uint8, generator=generator
    )
    labels = torch.randint(0, info.num_classes, (total,), generator=generator)
    return images[:num_train], labels[:num_train], images[num_train:], labels[num_train:]


def resize_uint8(images: torch.Tensor, side: int) -> torch.Tensor:
    """Resize a uint8 ``[N, C, H, W]`` batch to ``side`` x ``side`` (bilinear, antialiased)."""
    resized = F.interpolate(
        images.float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def channel_mean_std(
    images: torch.Tensor, chunk: int = 4096
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images on the 0..1 scale.

    Integer sums are exact (a 64x64 Tiny ImageNet split sums to < 2**63), and chunks keep the
    working copy small: a float copy of all of Tiny ImageNet would be 5 GB.
    """
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.int64)
    total_sq = torch.zeros(channels, dtype=torch.int64)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].to(torch.int64)
        total += block.sum(dim=(0, 2, 3))
        total_sq += block.square().sum(dim=(0, 2, 3))
    count = images.numel() // channels
    mean = total.double() / count
    var = total_sq.double() / count - mean.square()
    std = var.clamp_min(0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())
