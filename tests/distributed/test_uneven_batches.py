"""A global batch that does not divide over the ranks (three real gloo ranks): micro batches differ
by one sample, each rank weights its losses by its sample count, and the steps equal the one-process
steps on the mean over the global batch; the logged loss is that mean."""

import pytest
import tiny_training
import torch
import uneven_worker
from multiproc import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD_SIZE = 3
TOLERANCE = 1e-6  # relative (float64 model: rounding is ~1e-15)
# (optimizer, global batch, micro batch): 3 ranks x 1 accumulation x 7-8 micro; 3 x 2 x 3-4.
CASES = [("tvlars", 22, 8), ("lamb", 20, 4)]


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(uneven_worker.all_cases, CASES, world_size=WORLD_SIZE)


@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(map(str, case)))
def test_uneven_steps_equal_the_global_mean_steps(ranks, case):
    plan = ranks[0][case]["plan"]
    assert not plan.even  # the case exercises micro batches that differ between ranks
    reference = uneven_worker.train_reference(*case, WORLD_SIZE)
    initial = {name: p.double() for name, p in tiny_training.initial_parameters().items()}
    params = ranks[0][case]["params"]
    for rank in ranks[1:]:
        for name, tensor in params.items():
            assert torch.equal(tensor, rank[case]["params"][name]), name
    error, layer = tiny_training.worst_relative_error(params, reference["params"])
    assert error < TOLERANCE, f"{case}: {layer} off by {error:.2e}"
    moved, _ = tiny_training.worst_relative_error(initial, reference["params"])
    assert moved > 1e3 * TOLERANCE  # the steps are large enough for a wrong weight to show
    assert ranks[0][case]["losses"] == pytest.approx(reference["losses"], rel=TOLERANCE)
