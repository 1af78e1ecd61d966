"""Whole-batch augmentation on the training device: random pad-and-crop, horizontal flip, normalise.

At a 16K batch, per-sample PIL transforms in DataLoader workers cost more than the training step;
here a batch is augmented with a handful of tensor ops, wherever the batch lives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class BatchAugment:
    """``uint8 [B, C, H, W]`` -> normalised float32 ``[B, C, H, W]`` on the batch's device.

    Training: every sample is zero-padded by ``crop_padding`` pixels on each side, cropped back to
    ``H x W`` at a uniformly random offset, and mirrored left-right with probability 1/2 (as
    torchvision's ``RandomCrop(padding=p)`` + ``RandomHorizontalFlip()``). Then
    ``(x / 255 - mean) / std`` per channel. ``train=False`` only normalises. ``memory_format``:
    the output's layout (``torch.channels_last`` for an NHWC model).

    The random offsets and flips come from a CPU generator seeded with ``seed`` (give each rank its
    own, e.g. ``seed + rank``): the same seed gives the same augmentation on CPU and GPU, and
    :meth:`state_dict` lets a resumed run draw exactly what the uninterrupted run would have.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 4,
        flip: bool = True,
        train: bool = True,
        seed: int = 0,
        memory_format: torch.memory_format = torch.preserve_format,
    ) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive per channel, got {tuple(std)}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.crop_padding, self.flip, self.train = crop_padding, flip, train
        self.memory_format = memory_format
        std_t = torch.tensor(std, dtype=torch.float32)
        # (x / 255 - mean) / std == x * scale + shift: one multiply-add per element.
        scale = (1.0 / (255.0 * std_t)).view(-1, 1, 1)
        shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(-1, 1, 1)
        self.num_channels = len(mean)
        self._affine_on = {torch.device("cpu"): (scale, shift)}  # per device, copied once
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"expected uint8 [B, C, H, W], got {images.dtype} {list(images.shape)}"
            )
        if images.shape[1] != self.num_channels:
            raise ValueError(f"expected {self.num_channels} channels, got {images.shape[1]}")
        if self.train and (self.crop_padding or self.flip):
            images = self.crop_and_flip(images)
        if images.device not in self._affine_on:
            cpu_affine = self._affine_on[torch.device("cpu")]
            self._affine_on[images.device] = tuple(t.to(images.device) for t in cpu_affine)
        scale, shift = self._affine_on[images.device]
        # The float batch is written once, in the layout the model wants (model.channels_last).
        floats = images.to(torch.float32, memory_format=self.memory_format)
        return floats.mul_(scale).add_(shift)

    def crop_and_flip(self, images: torch.Tensor) -> torch.Tensor:
        """The geometric part alone: uint8 in, uint8 out, one gather for the whole batch."""
        batch, channels, height, width = images.shape
        pad = self.crop_padding
        offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=self.generator)
        if self.flip:
            flipped = torch.randint(0, 2, (batch,), generator=self.generator).bool()
        else:
            flipped = torch.zeros(batch, dtype=torch.bool)
        padded = F.pad(images, (pad, pad, pad, pad))
        padded_width = width + 2 * pad
        # A mirrored crop at x offset o is the crop of the mirrored padded image at offset 2p - o.
        # Mirror and original side by side, a flip becomes a shift of the offset: the whole batch
        # is then one strided gather, with no per-sample loop and no data-dependent host sync.
        both = torch.cat([padded, padded.flip(-1)], dim=-1)
        offset_y = offsets[0]
        offset_x = torch.where(flipped, padded_width + 2 * pad - offsets[1], offsets[1])
        # windows[b, c, y, x] is the (height x width) window of sample b, channel c at (y, x):
        # a view, nothing is copied until the gather below.
        stride = both.stride()
        windows = both.as_strided(
            (batch, channels, 2 * pad + 1, 2 * padded_width - width + 1, height, width),
            (stride[0], stride[1], stride[2], stride[3], stride[2], stride[3]),
        )
        index = (torch.arange(batch), offset_y, offset_x)
        batch_index, offset_y, offset_x = (t.to(images.device, non_blocking=True) for t in index)
        return windows[batch_index, :, offset_y, offset_x]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
