"""A tiny CNN trained for a few optimizer steps in every parallel setting the ZeRO tests compare.

Every setting sees the same global batches: ``NUM_STEPS`` optimizer steps of ``GRAD_ACCUM_STEPS``
micro-steps, each micro-step ``WORLD_SIZE`` chunks of ``MICRO_BATCH_SIZE`` samples, chunk ``r`` on rank
``r``. BatchNorm normalises with the statistics of the batch it sees, so the one-process reference
runs the full global batch chunk by chunk: each chunk's loss is scaled by
``1 / (WORLD_SIZE * GRAD_ACCUM_STEPS)`` and the gradients summed, which is exactly what data-parallel
training averages. Any remaining difference is the optimizer's.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tvlars_scale.checkpoint.layer_state import restore_layer_state, unsharded_layout
from tvlars_scale.optim import build_optimizer

NUM_STEPS = 10
GRAD_ACCUM_STEPS = 2
MICRO_BATCH_SIZE = 4
WORLD_SIZE = 2
NUM_CLASSES = 10
LAUNCH_DIR = Path(__file__).resolve().parents[2] / "launch"

# Step sizes large enough that every layer moves by a few percent in NUM_STEPS steps, so a wrong
# per-layer norm shows in the final parameters. lmbda/delay_steps make phi_t vary within 10 steps.
OPTIMIZER_SETTINGS = {
    "tvlars": {"lr": 2.0, "weight_decay": 5e-4, "eta": 1e-2, "lmbda": 0.2, "delay_steps": 4},
    "tvlars_official": {"lr": 0.05, "weight_decay": 5e-4, "eta": 1e-2, "lmbda": 0.05},
    "lars": {"lr": 0.5, "weight_decay": 5e-4, "eta": 2e-2},
    "lamb": {"lr": 2e-2, "weight_decay": 1e-2},
}


class TinyCNN(nn.Module):
    """Conv, BatchNorm, Linear, biases and a 1x1 scale: 477 elements of >= 2-D weights, 26 of 1-D.

    Under ZeRO-1/2 with two ranks the >= 2-D group (padded to 480) splits at element 240, inside
    ``conv2.weight`` (elements 108..396); ``logit_scale`` (1 element, 2-D so it is adapted) is smaller
    than the world size: under ZeRO-3 one rank holds it and the other only padding. ``conv1`` has no
    bias: BatchNorm right after it would make that bias's gradient pure rounding noise, which LAMB's
    normalised step turns into a full-size random update.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, NUM_CLASSES)
        self.logit_scale = nn.Parameter(torch.full((1, 1), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3))) * self.logit_scale


def make_data(world_size: int = WORLD_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[step, micro_step, rank, sample, 3, 8, 8]`` and their labels."""
    generator = torch.Generator().manual_seed(1234)
    shape = (NUM_STEPS, GRAD_ACCUM_STEPS, world_size, MICRO_BATCH_SIZE)
    images = torch.randn(*shape, 3, 8, 8, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, shape, generator=generator)
    return images, labels


def make_model_and_optimizer(optimizer_name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyCNN()
    # Two parameter groups: >= 2-D weights (decayed, adapted) and 1-D parameters (neither).
    optimizer = build_optimizer(optimizer_name, model, **OPTIMIZER_SETTINGS[optimizer_name])
    return model, optimizer


# The sharded runs' optimizer buffers agree with the one-process reference's to rounding (FSDP2 / HSDP,
# every optimizer: at most 3.2e-6); one restored from the wrong elements, rank, layer or key is off by
# order 1.
BUFFER_TOLERANCE = 1e-3


def assert_restores_on_one_process(
    optimizer_name: str,
    payloads: list[dict],
    trained: dict[str, torch.Tensor],
    reference: Reference,
) -> None:
    """Every rank's saved per-layer pieces rebuild the trained weights exactly in one unsharded
    process, with ``NUM_STEPS`` step counters and the optimizer buffers of the one-process
    reference, compared by value."""
    model, optimizer = make_model_and_optimizer(optimizer_name)
    restore_layer_state(optimizer, unsharded_layout(model, optimizer), payloads)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), trained[name]), name
        state, expected = optimizer.state[p], reference.state[name]
        assert state.keys() == expected.keys(), name
        assert state["step"] == NUM_STEPS, name
        for key, value in expected.items():
            if not torch.is_tensor(value):
                assert state[key] == value, f"{name}.{key}"
                continue
            assert state[key].shape == value.shape, f"{name}.{key}"
            error = float((state[key] - value).norm() / value.norm().clamp_min(1e-30))
            assert error < BUFFER_TOLERANCE, f"{name}.{key} off by {error:.2e}"


def initial_parameters() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {name: p.detach().clone() for name, p in TinyCNN().named_parameters()}


@dataclass(frozen=True)
class Reference:
    """What the one-process reference ends with."""

    params: dict[str, torch.Tensor]
    state: dict[str, dict]
    """The optimizer state of each parameter, by name."""
    stats: dict[str, dict[str, float]]
    """The last step's per-layer norms and trust ratios (``layer_stats()``)."""


def train_reference(optimizer_name: str, world_size: int = WORLD_SIZE) -> dict[str, torch.Tensor]:
    """The reference's trained parameters."""
    return train_reference_run(optimizer_name, world_size).params


def train_reference_run(optimizer_name: str, world_size: int = WORLD_SIZE) -> Reference:
    """One process holding every global batch (of ``world_size`` ranks' chunks)."""
    model, optimizer = make_model_and_optimizer(optimizer_name)
    images, labels = make_data(world_size)
    for step in range(NUM_STEPS):
        for micro_step in range(GRAD_ACCUM_STEPS):
            for rank in range(world_size):
                loss = F.cross_entropy(
                    model(images[step, micro_step, rank]), labels[step, micro_step, rank]
                )
                (loss / (world_size * GRAD_ACCUM_STEPS)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return Reference(
        params={name: p.detach().clone() for name, p in model.named_parameters()},
        state={
            name: {
                key: value.clone() if torch.is_tensor(value) else value
                for key, value in optimizer.state[p].items()
            }
            for name, p in model.named_parameters()
        },
        stats=optimizer.layer_stats(),
    )


def reference_layer_stats(optimizer_name: str, world_size: int = WORLD_SIZE) -> dict:
    """The per-layer norms and trust ratios of :func:`train_reference`'s last step."""
    return train_reference_run(optimizer_name, world_size).stats


def train_ddp(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """torch DistributedDataParallel on the ranks of the default group."""
    ddp_model = nn.parallel.DistributedDataParallel(model)
    images, labels = make_data()
    rank = dist.get_rank()
    for step in range(NUM_STEPS):
        for micro_step in range(GRAD_ACCUM_STEPS):
            boundary = micro_step == GRAD_ACCUM_STEPS - 1
            # collective: DDP all-reduces gradients at the accumulation boundary only
            with nullcontext() if boundary else ddp_model.no_sync():
                loss = F.cross_entropy(
                    ddp_model(images[step, micro_step, rank]), labels[step, micro_step, rank]
                )
                (loss / GRAD_ACCUM_STEPS).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def deepspeed_config(stage: int, **zero_overrides) -> dict:
    """``launch/deepspeed_zero{stage}.json`` with its ``"auto"`` fields filled as Accelerate would."""
    config = json.loads((LAUNCH_DIR / f"deepspeed_zero{stage}.json").read_text())
    filled = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH_SIZE,
        "gradient_accumulation_steps": GRAD_ACCUM_STEPS,
        "train_batch_size": MICRO_BATCH_SIZE * GRAD_ACCUM_STEPS * WORLD_SIZE,
        "gradient_clipping": 0.0,  # the trainer's default (optim.grad_clip unset)
    }
    for key, value in config.items():
        if value == "auto":
            config[key] = filled[key]
    for precision in ("fp16", "bf16"):
        config[precision] = {"enabled": False}  # the agreement is checked in fp32
    config["zero_optimization"].update(zero_overrides)
    return config


def train_deepspeed(engine) -> dict[str, torch.Tensor]:
    """Train an initialised DeepSpeed engine; return its full (gathered) parameters on every rank."""
    images, labels = make_data()
    rank = dist.get_rank()
    for step in range(NUM_STEPS):
        for micro_step in range(GRAD_ACCUM_STEPS):
            loss = F.cross_entropy(
                engine(images[step, micro_step, rank]), labels[step, micro_step, rank]
            )
            engine.backward(loss)  # scales by 1 / GRAD_ACCUM_STEPS
            engine.step()  # steps the optimizer at the accumulation boundary only
    return gather_parameters(engine.module)


def gather_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full parameters, through DeepSpeed's own gather (a no-op below ZeRO-3)."""
    import deepspeed

    params = list(module.parameters())
    # collective: ZeRO-3 all-gathers the partitioned parameters
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {name: p.detach().clone() for name, p in module.named_parameters()}


def assert_layer_stats_match(stats: dict, reference: dict, rel: float) -> None:
    """Every layer's weight / update norm and trust ratio, against the one-process run's."""
    assert list(stats) and set(stats) == set(reference)
    for name, values in reference.items():
        for key, value in values.items():
            assert stats[name][key] == pytest.approx(value, rel=rel), (name, key)


def worst_relative_error(
    params: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> tuple[float, str]:
    """Largest ``||a - b|| / ||b||`` over layers, and the layer where it occurs."""
    errors = {
        name: float((params[name] - ref).norm() / ref.norm()) for name, ref in reference.items()
    }
    worst = max(errors, key=errors.get)
    return errors[worst], worst
