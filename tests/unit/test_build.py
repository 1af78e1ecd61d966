"""The build phase: config sections -> optimizer, LR schedule, loaders, each built once."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from tvlars_scale import build
from tvlars_scale.batching import plan_batches
from tvlars_scale.config import OPTIM_CONFIGS, Config, ConfigError
from tvlars_scale.data import EpochShards
from tvlars_scale.optim import LAMB, LARS, TVLARS, schedules

# Constructor arguments that are not hyper-parameters of a config section.
NOT_CONFIGURED = {"self", "params", "foreach", "variant", "maximize", "differentiable", "fused"}
NOT_CONFIGURED |= {"dampening"}  # torch SGD's, kept at 0 as before
NOT_CONFIGURED |= {"amsgrad", "capturable"}  # torch AdamW's: plain AdamW; CUDA-graph plumbing
CONSTRUCTORS = {
    "tvlars": TVLARS,
    "tvlars_official": TVLARS,
    "lars": LARS,
    "lamb": LAMB,
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
}


def config(**sections) -> Config:
    return Config.model_validate(sections)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


@pytest.mark.parametrize("section", OPTIM_CONFIGS, ids=lambda cls: cls.model_fields["name"].default)
def test_optim_sections_hold_exactly_their_constructors_arguments(section):
    name = section.model_fields["name"].default
    fields = set(section.model_fields) - build.LOOP_OPTIM_KEYS
    fields = {"delay_steps" if field == "delay_epochs" else field for field in fields}
    arguments = set(inspect.signature(CONSTRUCTORS[name]).parameters) - NOT_CONFIGURED
    if name == "tvlars_official":  # phi_t = 1 / (0.1 + exp(lmbda (t + 1))) after the delay
        arguments -= {"alpha", "gamma_min"}
    assert fields == arguments


@pytest.mark.parametrize(
    ("optim", "cls", "expected"),
    [
        (
            {"name": "tvlars", "lr": 3.0, "lmbda": 1e-3, "delay_epochs": 2.5, "alpha": 0.5},
            TVLARS,
            {"variant": "paper", "lmbda": 1e-3, "delay_steps": 10, "alpha": 0.5},
        ),
        (
            {"name": "tvlars_official", "lmbda": 1e-2},
            TVLARS,
            {"variant": "official", "lmbda": 1e-2, "delay_steps": 40},  # 10 epochs by default
        ),
        (
            {"name": "tvlars_official", "delay_epochs": 0},
            TVLARS,
            {"variant": "official", "delay_steps": 0},  # the no-delay form
        ),
        (
            {"name": "adamw", "betas": [0.8, 0.99], "weight_decay": 5e-4},
            torch.optim.AdamW,
            {"betas": (0.8, 0.99), "eps": 1e-8, "amsgrad": False},
        ),
        ({"name": "lars", "nesterov": True, "eps": 0.0}, LARS, {"nesterov": True, "eps": 0.0}),
        ({"name": "lamb", "betas": [0.8, 0.99]}, LAMB, {"betas": (0.8, 0.99), "eps": 1e-6}),
        ({"name": "sgd", "momentum": 0.5}, torch.optim.SGD, {"momentum": 0.5, "nesterov": False}),
    ],
)
def test_optimizer_gets_the_sections_fields(optim, cls, expected):
    built = build.optimizer(config(optim=optim).optim, tiny_model(), lr=7.0, steps_per_epoch=4)
    assert type(built) is cls
    for key, value in {**expected, "lr": 7.0}.items():
        assert built.defaults[key] == value, key
    decayed, not_decayed = built.param_groups
    assert decayed["weight_decay"] == 5e-4 and not_decayed["weight_decay"] == 0.0
    assert [p.ndim for p in not_decayed["params"]] == [1, 1]  # the two biases


@pytest.mark.parametrize("name", ["tvlars", "tvlars_official", "lars", "lamb"])
def test_exclude_1d_false_decays_and_adapts_the_biases_too(name):
    model = tiny_model()
    cfg = config(optim={"name": name, "exclude_1d": False, "weight_decay": 5e-4}).optim
    [group] = build.optimizer(cfg, model, lr=7.0, steps_per_epoch=4).param_groups
    assert group["weight_decay"] == 5e-4 and group["adapt"] and not group["exclude_1d"]
    assert len(group["params"]) == len(list(model.parameters()))  # the biases with the weights


@pytest.mark.parametrize(("rule", "expected"), [("none", 2.0), ("linear", 8.0), ("sqrt", 4.0)])
def test_peak_lr_is_scaled_from_the_plan(rule, expected):
    cfg = config(
        optim={"lr": 2.0},
        batch={
            "global_batch_size": 1024,
            "micro_batch_size": 64,
            "lr_scaling": rule,
            "base_batch_size": 256,
        },
    )
    assert build.peak_lr(cfg, plan_batches(1024, 64, 2)) == expected


def test_lr_schedule_is_the_peak_times_the_schedule_of_the_step():
    total, per_epoch = 40, 4
    cosine = build.lr_schedule(
        config(
            schedule={"name": "warmup_cosine", "warmup_epochs": 2, "min_lr_ratio": 0.1}
        ).schedule,
        3.0,
        per_epoch,
        total,
    )
    poly = build.lr_schedule(
        config(schedule={"name": "poly", "power": 3.0}).schedule, 3.0, per_epoch, total
    )
    constant = build.lr_schedule(config().schedule, 3.0, per_epoch, total)
    for step in (0, 3, 7, 8, 20, 39):
        assert cosine(step) == 3.0 * schedules.warmup_cosine(step, total, 8, 0.1)
        assert poly(step) == 3.0 * schedules.polynomial_decay(step, total, 3.0, 0.0)
        assert constant(step) == 3.0
    assert cosine(0) == pytest.approx(3.0 / 8)  # warm-up from 1/8 of the peak
    assert math.isclose(cosine(total), 0.3)  # cosine down to min_lr_ratio of the peak


def test_a_global_batch_larger_than_the_data_is_refused():
    cfg = config(batch={"global_batch_size": 2048, "micro_batch_size": 64})
    data = build.image_data(cfg)  # digits: 1,437 training images

    class OneCpuRank:
        device, process_index = torch.device("cpu"), 0

    with pytest.raises(ConfigError) as caught:
        build.loaders(data, plan_batches(2048, 64, 1), OneCpuRank(), seed=0)
    assert caught.value.key == "batch.global_batch_size"
    assert "larger than the digits training set (1437" in caught.value.problem


def test_a_requeue_from_1024_to_1000_ranks_keeps_batch_lr_and_schedule():
    # ImageNet at 32K over 128 nodes, requeued on the 125 still healthy: the same steps.
    cfg = config(
        optim={"lr": 2.0},
        batch={"global_batch_size": 32768, "micro_batch_size": 128, "lr_scaling": "sqrt"},
    )
    num_samples = 1_281_167
    runs = {}
    for world_size in (1024, 1000):
        plan = build.batch_plan(cfg, world_size)
        shards = EpochShards(
            num_samples,
            plan.micro_batch_size,
            world_size - 1,
            world_size,
            grad_accum_steps=plan.grad_accum_steps,
            global_batch_size=plan.global_batch_size,
        )
        steps_per_epoch = len(shards) // plan.grad_accum_steps
        lr = build.peak_lr(cfg, plan)
        schedule = build.lr_schedule(cfg.schedule, lr, steps_per_epoch, 90 * steps_per_epoch)
        runs[world_size] = (
            plan.global_batch_size,
            steps_per_epoch,
            [schedule(t) for t in range(0, 3510, 39)],
        )
    assert runs[1024] == runs[1000]
    assert runs[1000][:2] == (32768, 39)
