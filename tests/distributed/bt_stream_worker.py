"""What each rank runs for test_bt_streamed_accumulation.py: Barlow Twins steps on streamed two-view
micro batches of a plan whose micro batches differ by one sample between ranks, through the
trainer's pieces (build's streaming loaders, the task's Gradient Cache, StepAccumulation, Accelerate
DDP); and the one-process reference: each step's loss over the whole global batch, one backward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from PIL import Image
from uneven_worker import train_prepared

from tvlars_scale import build
from tvlars_scale.batching import plan_batches
from tvlars_scale.config import load_config
from tvlars_scale.data import open_streaming
from tvlars_scale.tasks.barlow_twins import BarlowTwinsTask, barlow_twins_loss

SIDE, SEED, LR, NUM_STEPS = 16, 3, 0.05, 2
# 2 ranks: 14 = 2 rounds of 7, split 4 + 3 (rank 0 takes 4, rank 1 takes 3 in every round).
GLOBAL, MICRO = 14, 4


def make_tree(root: Path) -> str:
    """32 training JPEGs of assorted sizes in 4 classes (2 steps of 14 per epoch), 4 to evaluate."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 1)):
        for c in range(4):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                height, width = (int(v) for v in rng.integers(20, 40, 2))
                coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
                image.save(folder / f"{i}.JPEG", quality=90)
    return str(root)


def task_and_model(root: str, exact: bool, rank: int):
    config = load_config(
        "configs/digits.yaml",
        [
            "data.name=imagenet",
            "data.storage=stream",
            "data.crop_padding=4",
            "data.flip=true",
            "data.num_workers=0",
            f"data.image_size={SIDE}",
            "task.name=barlow_twins",
            "task.projector_dims=[16]",  # one Linear: no batch statistics anywhere (GroupNorm CNN)
            f"task.exact_accumulation={str(exact).lower()}",
            f"run.seed={SEED}",
        ],
    )
    data = open_streaming("imagenet", root, SIDE)
    task = BarlowTwinsTask(config, data, rank)
    torch.manual_seed(0)  # the same initial model everywhere
    model = task.build_model().double()  # float64: the order of the ranks' sums stays invisible
    views = task.augment
    task.augment = lambda images: tuple(view.double() for view in views(images))
    return config, data, task, model


def streamed_batches(config, data, plan, rank: int):
    train, _ = build._streaming_loaders(
        data, plan, torch.device("cpu"), rank, SEED, config.data, None, "barlow_twins"
    )
    return iter(train)


def train_ranks(root: str, exact: bool) -> dict:
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    rank = dist.get_rank()
    plan = plan_batches(GLOBAL, MICRO, dist.get_world_size())
    accelerator.gradient_accumulation_steps = plan.grad_accum_steps
    config, data, task, model = task_and_model(root, exact, rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, prepared_optimizer = accelerator.prepare(model, optimizer)
    batches = streamed_batches(config, data, plan, rank)
    return train_prepared(accelerator, model, prepared_optimizer, task, batches, plan, NUM_STEPS)


def both(root: str) -> dict:
    return {exact: train_ranks(root, exact) for exact in (True, False)}


def train_reference(root: str) -> dict:
    """One process, one micro batch of the whole global batch per step: the same samples (a step is
    the same window of the epoch's permutation whatever the split) and the same views (a function
    of (seed, epoch, index))."""
    config, data, task, model = task_and_model(root, exact=True, rank=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    batches = streamed_batches(config, data, plan_batches(GLOBAL, GLOBAL, 1), rank=0)
    losses = []
    for _ in range(NUM_STEPS):
        views, _ = next(batches)
        loss = barlow_twins_loss(*model(*task.augment(views)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"params": dict(model.named_parameters()), "losses": losses}
