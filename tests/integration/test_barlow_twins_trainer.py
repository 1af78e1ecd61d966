"""Barlow Twins through the trainer: exact accumulation (micro 8 x 4) trains the same parameters as
one micro-batch of 32 for a model without batch statistics; plain accumulation does not."""

import pytest
import torch

from tvlars_scale.config import load_config
from tvlars_scale.trainer import Trainer

NUM_STEPS = 3


def fixed_views(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample deterministic views: the same pixels whatever the micro-batch split."""
    x = images.float() / 255
    return x - 0.3, 0.5 * x.flip(-1)


def parameters_after_training(tmp_path, micro_batch_size: int, exact: bool) -> list[torch.Tensor]:
    config = load_config(
        "configs/digits.yaml",
        [
            "task.name=barlow_twins",
            "task.projector_dims=[32]",  # one Linear: no BatchNorm anywhere (digits_cnn: GroupNorm)
            f"task.exact_accumulation={str(exact).lower()}",
            "task.linear_eval_epochs=1",
            "batch.global_batch_size=32",
            f"batch.micro_batch_size={micro_batch_size}",
            f"run.output_dir={tmp_path / f'm{micro_batch_size}-{exact}'}",
            "run.trackers=[]",
            "run.progress_bar=false",
        ],
    )
    trainer = Trainer(config)
    try:
        trainer.setup()
        trainer.task.augment = fixed_views
        trainer.train_loader.set_epoch(0)
        batches = iter(trainer.train_loader)
        for _ in range(NUM_STEPS):
            trainer.train_step([next(batches) for _ in range(trainer.plan.grad_accum_steps)])
        return [p.detach().clone() for p in trainer.model.parameters()]
    finally:
        trainer.close()


@pytest.mark.slow
def test_exact_accumulation_matches_one_big_micro_batch(tmp_path):
    reference = parameters_after_training(tmp_path, micro_batch_size=32, exact=True)
    exact = parameters_after_training(tmp_path, micro_batch_size=8, exact=True)
    plain = parameters_after_training(tmp_path, micro_batch_size=8, exact=False)
    for got, want in zip(exact, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # 3 steps of float drift
    worst = max((p - r).abs().max().item() for p, r in zip(plain, reference, strict=True))
    assert worst > 1e-3, worst
