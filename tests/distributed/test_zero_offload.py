"""ZeRO-Offload: ZeRO-2 and ZeRO-3 with ``offload_optimizer: cpu`` (the shipped JSONs) keep the client
optimizer -- TVLARS, LARS, LAMB step the fp32 partitions in host memory -- and train exactly like
one process holding the whole batch, with one all-reduce per step() call (two real gloo ranks)."""

import offload_worker
import pytest
import tiny_training
from multiproc import run_ranks

# ~50 s on an idle 2-core machine (two DeepSpeed engines per optimizer): `pytest -m long`.
pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.long]

TOLERANCE = 1e-5  # relative, fp32: the bar of the on-device ZeRO stages
OPTIMIZERS = list(tiny_training.OPTIMIZER_SETTINGS)


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(offload_worker.all_settings)


@pytest.fixture(scope="module")
def references():
    return {name: tiny_training.train_reference(name) for name in OPTIMIZERS}


@pytest.mark.parametrize("stage", offload_worker.STAGES)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_offloaded_training_matches_one_process(ranks, references, stage, optimizer_name):
    for results in ranks:
        result = results[stage, optimizer_name]
        # DeepSpeed kept our optimizer (not its DeepSpeedCPUAdam) and really offloads.
        assert result["offloaded"], result["zero_optimizer"]
        assert (
            result["client"]
            == type(tiny_training.make_model_and_optimizer(optimizer_name)[1]).__name__
        )
        error, layer = tiny_training.worst_relative_error(
            result["params"], references[optimizer_name]
        )
        assert error < TOLERANCE, (
            f"ZeRO-{stage} offload/{optimizer_name}: {layer} off by {error:.2e}"
        )


@pytest.mark.parametrize("stage", offload_worker.STAGES)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_one_all_reduce_per_step_call(ranks, stage, optimizer_name):
    for results in ranks:
        counts = dict(results[stage, optimizer_name]["collectives"])
        step_calls = counts.pop("step_calls")
        assert step_calls >= 2 * tiny_training.NUM_STEPS  # once per (sub-)group and step
        assert counts == {"all_reduce": step_calls}
