"""RandAugment / TrivialAugment per sample (torchvision.transforms.v2), seeded per sample.

torchvision's policies draw their operation and magnitude from torch's global CPU generator. Here
that generator is forked (saved, and restored afterwards: nothing else sees these draws) and seeded
per sample from the sample's own NumPy generator, which the loaders seed with (seed, epoch, sample
index). A sample's augmentation then depends on nothing else: not on the worker, rank or micro
batch that draws it, nor on a resume.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torchvision.transforms import v2

__all__ = ["POLICIES", "SampleAugment"]

POLICIES: dict[str, Callable[[], v2.Transform]] = {
    "randaugment": v2.RandAugment,  # num_ops=2, magnitude=9 (torchvision's and timm's rand-m9)
    "trivialaugment": v2.TrivialAugmentWide,
}
"""``data.augment`` -> the torchvision v2 policy, with its defaults."""


class SampleAugment:
    """``uint8 [C, H, W]`` -> ``uint8 [C, H, W]`` through ``POLICIES[policy]``. Picklable, so it
    travels to the decode workers."""

    def __init__(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(
                f"unknown augmentation policy {policy!r} (known: {', '.join(POLICIES)})"
            )
        self.policy = policy
        self.transform = POLICIES[policy]()

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """One sample, its policy draws seeded from ``rng`` (the sample's generator)."""
        with torch.random.fork_rng(devices=[]):
            return self._seeded(image, rng)

    def batch(
        self, images: torch.Tensor, seed: int, epoch: int, indices: torch.Tensor
    ) -> torch.Tensor:
        """In-memory micro batch ``uint8 [B, C, H, W]`` of samples ``indices`` (dataset indices)
        in ``epoch``: sample ``i`` seeded by ``(seed, epoch, indices[i])``; one loop on the CPU
        side, the images stay on their device."""
        out = torch.empty_like(images)
        # host sync: the micro batch's sample indices, to seed each sample's generator.
        keys = indices.tolist()
        with torch.random.fork_rng(devices=[]):
            for slot, index in enumerate(keys):
                rng = np.random.default_rng([seed, epoch, index])
                out[slot] = self._seeded(images[slot], rng)
        return out

    def _seeded(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        # The CPU generator only: torch.manual_seed would also reseed every CUDA generator.
        torch.default_generator.manual_seed(int(rng.integers(2**63)))
        return self.transform(image)
