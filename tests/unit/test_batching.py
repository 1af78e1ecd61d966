"""Batch arithmetic: derived accumulation, refusal of splits that do not divide, LR scaling."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from tvlars_scale.accelerate_setup import put_plan_into_deepspeed
from tvlars_scale.batching import BatchPlan, epochs_to_steps, plan_batches, scale_lr
from tvlars_scale.config import ConfigError


def test_the_paper_scale_split_is_described_in_one_line():
    plan = plan_batches(16384, 64, 2)
    assert plan.grad_accum_steps == 128
    assert plan.describe() == "effective batch 16384 = 64 micro x 128 accumulation x 2 ranks"
    assert plan_batches(256, 64, 1).describe() == (
        "effective batch 256 = 64 micro x 4 accumulation x 1 rank"
    )


@pytest.mark.parametrize("micro", [1, 8, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 16])
@pytest.mark.parametrize("accum", [1, 5, 128])
def test_accumulation_is_recovered_from_any_product(micro, world, accum):
    plan = plan_batches(micro * world * accum, micro, world)
    assert plan == BatchPlan(micro * world * accum, micro, world, accum)


@pytest.mark.parametrize(
    ("global_batch", "micro", "world"),
    [(100, 64, 1), (64, 64, 3), (96, 16, 5), (512, 64, 3), (32768, 128, 1000), (32768, 128, 3072)],
)
def test_splits_that_leave_a_rest_take_every_sample_once(global_batch, micro, world):
    plan = plan_batches(global_batch, micro, world)
    assert plan.grad_accum_steps == math.ceil(global_batch / (micro * world))
    sizes = [plan.rank_micro_batch_sizes(rank) for rank in range(world)]
    assert all(len(rank_sizes) == plan.grad_accum_steps for rank_sizes in sizes)
    flat = [size for rank_sizes in sizes for size in rank_sizes]
    assert sum(flat) == global_batch
    assert max(flat) == plan.micro_batch_size <= micro
    assert min(flat) >= plan.micro_batch_size - 1 >= 0
    # Each micro batch's mean loss, weighted, then divided by the accumulation and averaged over
    # the ranks, counts each of its samples 1 / global_batch: the step is the global mean.
    for size in set(flat):
        share = plan.loss_weight(size) / (size * plan.grad_accum_steps * world)
        assert share == pytest.approx(1 / global_batch, rel=1e-15)


def test_32k_over_1000_and_3072_ranks_is_described_in_one_line():
    assert plan_batches(32768, 128, 1000).describe() == (
        "effective batch 32768 = 1000 ranks x 1 accumulation x 32-33 micro "
        "(768 of the 1000 micro batches take 33)"
    )
    assert plan_batches(32768, 128, 3072).describe() == (
        "effective batch 32768 = 3072 ranks x 1 accumulation x 10-11 micro "
        "(2048 of the 3072 micro batches take 11)"
    )
    assert plan_batches(512, 64, 3).describe() == (
        "effective batch 512 = 3 ranks x 3 accumulation x 56-57 micro "
        "(8 of the 9 micro batches take 57)"
    )


def test_an_even_split_weights_nothing():
    plan = plan_batches(16384, 64, 2)
    assert plan.even and plan.loss_weight(64) == 1.0
    assert plan.rank_micro_batch_sizes(1) == [64] * 128


def test_fewer_samples_than_ranks_are_refused():
    with pytest.raises(ConfigError) as caught:
        plan_batches(8, 4, 16)
    assert caught.value.key == "batch.global_batch_size"
    assert "smaller than the world size 16" in caught.value.problem


def test_lr_scaling_rules():
    assert scale_lr(0.1, "none", 8192, 256) == 0.1
    assert scale_lr(0.1, "linear", 8192, 256) == pytest.approx(0.1 * 32)
    assert scale_lr(0.1, "sqrt", 8192, 256) == pytest.approx(0.1 * math.sqrt(32))
    # At the base batch every rule is the identity.
    for rule in ("none", "linear", "sqrt"):
        assert scale_lr(3.0, rule, 512, 512) == 3.0
    with pytest.raises(ValueError, match="unknown lr scaling"):
        scale_lr(0.1, "cubic", 512, 256)


def test_epochs_to_steps_uses_the_real_steps_per_epoch():
    assert epochs_to_steps(10, 5) == 50
    assert epochs_to_steps(2.4, 5) == 12
    assert epochs_to_steps(0, 97) == 0


def _accelerator_with_deepspeed_config(ds_config: dict) -> SimpleNamespace:
    plugin = SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))


def test_the_plan_fills_deepspeed_auto_values():
    ds_config = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
    put_plan_into_deepspeed(_accelerator_with_deepspeed_config(ds_config), plan_batches(512, 32, 2))
    assert ds_config == {
        "train_batch_size": 512,
        "train_micro_batch_size_per_gpu": 32,
        "gradient_accumulation_steps": 8,
        "gradient_clipping": 0.0,  # Accelerate would make "auto" 1.0; DDP runs do not clip
    }


def test_a_deepspeed_file_that_hard_codes_another_accumulation_is_refused():
    # Accelerate's templates say 1 and only warn when the trainer wants another value.
    ds_config = {"gradient_accumulation_steps": 1, "train_micro_batch_size_per_gpu": "auto"}
    with pytest.raises(ConfigError) as caught:
        put_plan_into_deepspeed(
            _accelerator_with_deepspeed_config(ds_config), plan_batches(512, 32, 2)
        )
    assert caught.value.key == "deepspeed.gradient_accumulation_steps"
    assert "says 1" in caught.value.problem and "needs 8" in caught.value.problem
