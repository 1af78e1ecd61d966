"""What each rank runs for test_ema_clip_ranks.py: gradient clipping and the moving average of the weights
under DDP, DeepSpeed ZeRO-1/2/3 and FSDP2, in ONE launch of two ranks, on tiny_training's model and
batches; the one-process reference (:func:`reference`) runs in the test process."""

from __future__ import annotations

from contextlib import nullcontext

import tiny_training
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from zero_worker import COLLECTIVES

from tvlars_scale.checkpoint.layer_state import capture_layer_state, unsharded_layout
from tvlars_scale.optim.sharding import ShardedLayout
from tvlars_scale.training.clip import clip_grad_norm
from tvlars_scale.training.ema import WeightEMA

OPTIMIZER = "tvlars"
MAX_NORM = 0.25
"""Below every step's gradient norm (0.35 to 1): every step clips."""
EMA = {"decay": 0.8, "warmup_steps": 3}
ZERO_STAGES = (1, 2, 3)


def probe() -> torch.Tensor:
    """The inputs the averaged model is run on (BatchNorm in training mode: batch statistics, so
    the output depends on the parameters alone, not on each rank's running statistics)."""
    return torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(7))


def _norm_after(layout: ShardedLayout) -> float:
    return float(clip_grad_norm(layout, float("inf")))  # a factor of exactly 1: measures only


def reference() -> dict:
    """One process holding every global batch, clipped by clip_grad_norm, averaged by WeightEMA."""
    model, optimizer = tiny_training.make_model_and_optimizer(OPTIMIZER)
    layout = unsharded_layout(model, optimizer)
    ema = WeightEMA(layout, model, **EMA)
    images, labels = tiny_training.make_data()
    before, after = [], []
    for step in range(tiny_training.NUM_STEPS):
        for micro_step in range(tiny_training.GRAD_ACCUM_STEPS):
            for rank in range(tiny_training.WORLD_SIZE):
                x, y = images[step, micro_step, rank], labels[step, micro_step, rank]
                loss = F.cross_entropy(model(x), y)
                (loss / (tiny_training.WORLD_SIZE * tiny_training.GRAD_ACCUM_STEPS)).backward()
        before.append(float(clip_grad_norm(layout, MAX_NORM)))
        after.append(_norm_after(layout))
        optimizer.step()
        optimizer.zero_grad()
        ema.update(step + 1)
    averaged = ema.full_layers()
    with ema.swapped_in():
        output = model(probe()).detach()
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "ema": {n: t.clone() for n, t in averaged.items()},
        "norms": before,
        "after": after,
        "ema_output": output,
    }


class _CountCollectives:
    """Counts torch.distributed's collectives issued inside the block."""

    def __enter__(self):
        self.counts, self.originals = {}, {n: getattr(dist, n) for n in COLLECTIVES}

        def counting(name):
            def collective(*args, **kwargs):
                self.counts[name] = self.counts.get(name, 0) + 1
                return self.originals[name](*args, **kwargs)

            return collective

        for name in COLLECTIVES:
            setattr(dist, name, counting(name))
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(dist, name, original)


def _finish(model: nn.Module, ema: WeightEMA, gather) -> dict:
    """The trained parameters (``gather()``: whole, on every rank), the averaged layers made whole,
    the probe's output with the average swapped in, and whether the swap put the raw parameters
    back bitwise."""
    params = gather()
    averaged = {n: t.clone() for n, t in ema.full_layers().items()}
    with ema.swapped_in():
        output = model(probe()).detach()
    after = gather()
    restored = all(torch.equal(after[n], t) for n, t in params.items())
    return {"params": params, "ema": averaged, "ema_output": output, "restored": restored}


def run_ddp() -> dict:
    model, optimizer = tiny_training.make_model_and_optimizer(OPTIMIZER)
    layout = unsharded_layout(model, optimizer)
    ema = WeightEMA(layout, model, **EMA)
    ddp = nn.parallel.DistributedDataParallel(model)
    images, labels = tiny_training.make_data()
    rank, norms, counts = dist.get_rank(), [], []
    for step in range(tiny_training.NUM_STEPS):
        for micro_step in range(tiny_training.GRAD_ACCUM_STEPS):
            boundary = micro_step == tiny_training.GRAD_ACCUM_STEPS - 1
            # collective: DDP all-reduces gradients at the accumulation boundary only
            with nullcontext() if boundary else ddp.no_sync():
                loss = F.cross_entropy(
                    ddp(images[step, micro_step, rank]), labels[step, micro_step, rank]
                )
                (loss / tiny_training.GRAD_ACCUM_STEPS).backward()
        with _CountCollectives() as counter:
            norms.append(float(clip_grad_norm(layout, MAX_NORM)))
        counts.append(counter.counts)
        optimizer.step()
        optimizer.zero_grad()
        ema.update(step + 1)
    gather = lambda: {n: p.detach().clone() for n, p in model.named_parameters()}  # noqa: E731
    return {"norms": norms, "counts": counts, **_finish(model, ema, gather)}


def run_zero(stage: int) -> dict:
    """DeepSpeed clips (gradient_clipping = MAX_NORM) and reports the norm; the average follows the
    fp32 partitions."""
    import deepspeed
    from zero_worker import checkpointer_of

    from tvlars_scale.optim.zero_layout import bind_zero

    model, optimizer = tiny_training.make_model_and_optimizer(OPTIMIZER)
    config = tiny_training.deepspeed_config(stage)
    config["gradient_clipping"] = MAX_NORM
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    bind_zero(engine)
    layout = checkpointer_of(engine, optimizer).layout  # what the trainer averages
    ema = WeightEMA(layout, engine.module, **EMA)
    images, labels = tiny_training.make_data()
    rank, norms = dist.get_rank(), []
    for step in range(tiny_training.NUM_STEPS):
        for micro_step in range(tiny_training.GRAD_ACCUM_STEPS):
            loss = F.cross_entropy(
                engine(images[step, micro_step, rank]), labels[step, micro_step, rank]
            )
            engine.backward(loss)
            engine.step()
        norms.append(float(engine.get_global_grad_norm()))
        ema.update(step + 1)
    return {
        "norms": norms,
        "layers": capture_layer_state(optimizer, layout, owner=True, ema=ema.shadows),
        **_finish(engine, ema, lambda: tiny_training.gather_parameters(engine.module)),
    }


def run_fsdp() -> dict:
    from fsdp_worker import full_parameters, make_mesh, make_sharded

    model, optimizer = make_sharded(OPTIMIZER, make_mesh((tiny_training.WORLD_SIZE,)))
    layout = optimizer.layout
    ema = WeightEMA(layout, model, **EMA)
    images, labels = tiny_training.make_data()
    rank, norms, after, counts = dist.get_rank(), [], [], []
    for step in range(tiny_training.NUM_STEPS):
        for micro_step in range(tiny_training.GRAD_ACCUM_STEPS):
            # collective: FSDP2 reduce-scatters at the last micro-batch only
            model.set_requires_gradient_sync(micro_step == tiny_training.GRAD_ACCUM_STEPS - 1)
            loss = F.cross_entropy(
                model(images[step, micro_step, rank]), labels[step, micro_step, rank]
            )
            (loss / tiny_training.GRAD_ACCUM_STEPS).backward()
        with _CountCollectives() as counter:
            norms.append(float(clip_grad_norm(layout, MAX_NORM)))
        counts.append(counter.counts)
        after.append(_norm_after(layout))
        optimizer.step()
        optimizer.zero_grad()
        ema.update(step + 1)
    return {
        "norms": norms,
        "after": after,
        "counts": counts,
        "layers": capture_layer_state(optimizer, layout, owner=True, ema=ema.shadows),
        **_finish(model, ema, lambda: full_parameters(model)),
    }


def all_settings() -> dict:
    results = {"ddp": run_ddp(), "fsdp2": run_fsdp()}
    for stage in ZERO_STAGES:
        results[f"zero{stage}"] = run_zero(stage)
    return results
