"""Barlow Twins on streamed two-view micro batches under two gloo ranks whose micro batches differ by
one sample (4 + 3): the Gradient Cache's steps equal the one-process steps on the loss of the whole
global batch; plain accumulation (the mean of micro-batch losses) does not."""

import bt_stream_worker
import pytest
import torch
from multiproc import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Relative. The model runs in float64, but the loss computes the cross-correlation in float32 on
# purpose (barlow_twins.cross_correlation): its rounding, ~4e-7 here, is what the split changes.
TOLERANCE = 2e-6


def relative_error(got: dict, want: dict) -> float:
    return max(((got[name] - want[name]).norm() / want[name].norm()).item() for name in want)


def test_exact_accumulation_of_streamed_views_equals_the_global_batch_step(tmp_path):
    root = bt_stream_worker.make_tree(tmp_path / "tree")
    ranks = run_ranks(bt_stream_worker.both, root)
    reference = bt_stream_worker.train_reference(root)
    plan = ranks[0][True]["plan"]
    assert not plan.even and plan.rank_micro_batch_sizes(0) != plan.rank_micro_batch_sizes(1)
    exact = ranks[0][True]
    for name, tensor in exact["params"].items():  # DDP: every rank holds the same parameters
        assert torch.equal(tensor, ranks[1][True]["params"][name]), name
    initial = bt_stream_worker.task_and_model(root, exact=True, rank=0)[3]
    flat = torch.cat([p.detach().flatten() for p in initial.parameters()])
    final = torch.cat([p.detach().flatten() for p in reference["params"].values()])
    moved = ((final - flat).norm() / final.norm()).item()
    assert moved > 1e-3  # the steps are large enough for a wrong gradient to show
    error = relative_error(exact["params"], reference["params"])
    plain = relative_error(ranks[0][False]["params"], reference["params"])
    print(f"relative error: exact {error:.2e}, plain {plain:.2e}, steps moved {moved:.2e}")
    assert error < TOLERANCE
    assert exact["losses"] == pytest.approx(reference["losses"], rel=TOLERANCE)
    assert plain > 1e3 * TOLERANCE
