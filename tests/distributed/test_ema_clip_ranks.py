"""Gradient clipping (optim.grad_clip) and the moving average of the weights (run.ema) on two real
ranks (gloo) under DDP, DeepSpeed ZeRO-1/2/3 (its own gradient_clipping) and FSDP2, against one
process holding the full batch: the same norm before clipping, the same clipped training, the same
average (made whole from the shards), evaluated by swapping it in; clipping costs at most one
all-reduce; a sharded average saved per layer loads on one process."""

import ema_clip_worker
import pytest
import tiny_training
import torch
from multiproc import run_ranks

from tvlars_scale.checkpoint.layer_state import restore_layer_state, unsharded_layout
from tvlars_scale.training.ema import WeightEMA

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SETTINGS = ["ddp", "fsdp2", *(f"zero{stage}" for stage in ema_clip_worker.ZERO_STAGES)]
TOLERANCE = 1e-6  # relative, fp32


@pytest.fixture(scope="module")
def ranks():
    """Both ranks' results of every setting, from one launch."""
    return run_ranks(ema_clip_worker.all_settings)


@pytest.fixture(scope="module")
def reference():
    # The ranks compute on one thread each (multiproc.py); so does the reference, or the sums'
    # order differs with the machine's core count and training drifts apart by 1e-3 in 10 steps.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ema_clip_worker.reference()
    finally:
        torch.set_num_threads(threads)


def test_the_reference_clips_every_step(reference):
    # The norm before clipping is above the threshold, after it exactly the threshold.
    assert min(reference["norms"]) > 1.2 * ema_clip_worker.MAX_NORM
    assert reference["after"] == pytest.approx([ema_clip_worker.MAX_NORM] * 10, rel=1e-5)


@pytest.mark.parametrize("setting", SETTINGS)
def test_norm_before_clipping_matches_one_process(ranks, reference, setting):
    for rank in ranks:
        assert rank[setting]["norms"] == pytest.approx(reference["norms"], rel=TOLERANCE)


def test_fsdp2_norm_after_clipping_is_the_threshold(ranks, reference):
    for rank in ranks:
        assert rank["fsdp2"]["after"] == pytest.approx(reference["after"], rel=TOLERANCE)


@pytest.mark.parametrize("setting", ["ddp", "fsdp2"])
def test_clipping_costs_one_all_reduce_when_sharded(ranks, setting):
    expected = {"all_reduce": 1} if setting == "fsdp2" else {}
    for rank in ranks:
        assert rank[setting]["counts"] == [expected] * tiny_training.NUM_STEPS


@pytest.mark.parametrize("setting", SETTINGS)
def test_clipped_training_matches_one_process(ranks, reference, setting):
    error, layer = tiny_training.worst_relative_error(
        ranks[0][setting]["params"], reference["params"]
    )
    assert error < 1e-5, f"{setting}: {layer} off by {error:.2e}"  # the bar of the ZeRO tests


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_average_matches_one_process(ranks, reference, setting):
    for rank in ranks:
        error, layer = tiny_training.worst_relative_error(rank[setting]["ema"], reference["ema"])
        assert error < TOLERANCE, f"{setting}: {layer} off by {error:.2e}"
    # It is neither the final nor the initial weights: the comparison can fail.
    for params in (reference["params"], tiny_training.initial_parameters()):
        error, _ = tiny_training.worst_relative_error(reference["ema"], params)
        assert error > 1e-3


@pytest.mark.parametrize("setting", SETTINGS)
def test_evaluation_swaps_the_average_in_and_the_weights_back(ranks, reference, setting):
    for rank in ranks:
        result = rank[setting]
        assert result["restored"]
        torch.testing.assert_close(
            result["ema_output"], reference["ema_output"], rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("setting", ["zero2", "fsdp2"])
def test_a_two_rank_average_loads_on_one_process(ranks, setting):
    model, optimizer = tiny_training.make_model_and_optimizer(ema_clip_worker.OPTIMIZER)
    layout = unsharded_layout(model, optimizer)
    ema = WeightEMA(layout, model, **ema_clip_worker.EMA)
    payloads = [rank[setting]["layers"] for rank in ranks]
    assert restore_layer_state(optimizer, layout, payloads, ema=ema.shadows)
    averaged = ema.full_layers()
    for name, value in ranks[0][setting]["ema"].items():
        assert torch.equal(averaged[name], value), name
