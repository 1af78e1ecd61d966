"""What each rank runs for test_uneven_batches.py: steps of a global batch that does not divide over
the ranks, through the trainer's pieces (plan, sampler, task, accumulation, Accelerate DDP); and the
one-process reference that takes each step's global mean loss directly."""

from __future__ import annotations

from contextlib import nullcontext

import tiny_training
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, reduce

from tvlars_scale.accelerate_setup import StepAccumulation
from tvlars_scale.batching import BatchPlan, plan_batches
from tvlars_scale.data import MicroBatchLoader
from tvlars_scale.tasks import MicroBatches, Task

NUM_STEPS = 3
SEED = 5


class CrossEntropyTask(Task):
    """Classification without augmentation: the loss of the tiny CNN on raw float images."""

    def build_model(self):
        raise NotImplementedError

    def training_loss(self, model, images, labels):
        return F.cross_entropy(model(images), labels)

    def eval_outputs(self, model, images, labels):
        raise NotImplementedError

    def eval_metrics(self, outputs):
        raise NotImplementedError


def float64_model_and_optimizer(optimizer_name: str):
    """The tiny CNN in float64: rounding (the order of the ranks' sums) stays far below the
    tolerance, while a step weighted wrongly is off by percents."""
    model, optimizer = tiny_training.make_model_and_optimizer(optimizer_name)
    return model.double(), optimizer  # the same parameters, converted in place


def make_data(global_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(99)
    num_samples = NUM_STEPS * global_batch_size + 5  # a tail that fills no step
    images = torch.randn(num_samples, 3, 8, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, tiny_training.NUM_CLASSES, (num_samples,), generator=generator)
    return images, labels


def loader(plan: BatchPlan, rank: int, images, labels) -> MicroBatchLoader:
    return MicroBatchLoader(
        images,
        labels,
        plan.micro_batch_size,
        rank,
        plan.world_size,
        seed=SEED,
        grad_accum_steps=plan.grad_accum_steps,
        global_batch_size=plan.global_batch_size,
    )


def train_ranks(optimizer_name: str, global_batch_size: int, micro_batch_size: int) -> dict:
    """This rank's share of ``NUM_STEPS`` steps; returns the parameters and each step's loss as
    the trainer logs it (the data-parallel mean of the ranks' returned losses)."""
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    plan = plan_batches(global_batch_size, micro_batch_size, dist.get_world_size())
    accelerator.gradient_accumulation_steps = plan.grad_accum_steps
    model, optimizer = float64_model_and_optimizer(optimizer_name)
    model, prepared_optimizer = accelerator.prepare(model, optimizer)
    batches = iter(loader(plan, dist.get_rank(), *make_data(global_batch_size)))
    return train_prepared(
        accelerator, model, prepared_optimizer, CrossEntropyTask(), batches, plan, NUM_STEPS
    )


def train_prepared(accelerator, model, optimizer, task: Task, batches, plan, num_steps) -> dict:
    """``num_steps`` optimizer steps of the trainer's accumulation (``StepAccumulation``) on what
    ``accelerator.prepare`` returned; the plan, the final parameters and each step's loss as the
    trainer logs it (the data-parallel mean of the ranks' returned losses)."""
    losses = []
    for _ in range(num_steps):
        accelerator.step = 0
        accumulation = StepAccumulation(accelerator, model, nullcontext(), 0, plan)
        loss = task.forward_backward(
            model, MicroBatches(batches, plan.grad_accum_steps), accumulation
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(reduce(loss, reduction="mean")))  # collective: the logged mean
    params = {name: p.detach().clone() for name, p in model.module.named_parameters()}
    return {"plan": plan, "params": params, "losses": losses}


def train_reference(
    optimizer_name: str, global_batch_size: int, micro_batch_size: int, world_size: int
) -> dict:
    """One process: each step's loss is the sum of every sample's loss over the global batch, divided
    by its size. The forward passes run on the ranks' micro batches (batch norm sees the samples
    each rank sees), in one process, with no weighting by the plan."""
    plan = plan_batches(global_batch_size, micro_batch_size, world_size)
    model, optimizer = float64_model_and_optimizer(optimizer_name)
    data = make_data(global_batch_size)
    shares = [iter(loader(plan, rank, *data)) for rank in range(world_size)]
    losses = []
    for _ in range(NUM_STEPS):
        total = 0.0
        for _ in range(plan.grad_accum_steps):
            for share in shares:
                images, labels = next(share)
                loss = F.cross_entropy(model(images), labels, reduction="sum") / global_batch_size
                loss.backward()
                total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"params": params, "losses": losses}


def all_cases(cases) -> dict:
    return {case: train_ranks(*case) for case in cases}
