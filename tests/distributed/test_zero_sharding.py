"""Layer-wise optimizers under DeepSpeed ZeRO-1/2/3 (two real ranks, gloo) train exactly like one
process holding the full batch, with one all-reduce per step() call; shard-local norms do not. The
checkpoint saves through the layout the optimizer is bound to, and loads on one process."""

import pytest
import tiny_training
import torch
import zero_worker
from multiproc import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TOLERANCE = 1e-5  # relative, fp32
OPTIMIZERS = list(tiny_training.OPTIMIZER_SETTINGS)
SHARDED_SETTINGS = list(zero_worker.ZERO_SETTINGS)


@pytest.fixture(scope="module")
def ranks():
    """Both ranks' results of every setting and optimizer, from one launch (about 45 s)."""
    return run_ranks(zero_worker.all_settings)


@pytest.fixture(scope="module")
def references():
    return {name: tiny_training.train_reference_run(name) for name in OPTIMIZERS}


def test_the_model_exercises_the_partition_edge_cases(ranks):
    # DeepSpeed's own bookkeeping (params_in_partition), not our layout, says which layers each
    # rank's ZeRO-1/2 partition touches: some layer must be cut between the two ranks.
    for setting, rank0_groups in ranks[0]["partition_layers"].items():
        if rank0_groups is None:  # ZeRO-3 splits every layer
            continue
        rank1_groups = ranks[1]["partition_layers"][setting]
        straddling = set(rank0_groups[0]) & set(rank1_groups[0])
        assert straddling, f"{setting}: no layer straddles the partition boundary"
    smallest = min(p.numel() for p in tiny_training.TinyCNN().parameters())
    assert smallest < tiny_training.WORLD_SIZE


@pytest.mark.parametrize("setting", [*SHARDED_SETTINGS, "zero1_bf16"])
def test_pieces_cover_every_layer_exactly_once(ranks, setting):
    # What the pieces of all ranks cover, against the whole parameters DeepSpeed gathers.
    coverage = ranks[0]["coverage"][setting]
    assert coverage["covered"].keys() == coverage["full"].keys()
    for name, (numel, squares) in coverage["covered"].items():
        full_numel, full_squares = coverage["full"][name]
        assert numel == full_numel, name
        assert squares == pytest.approx(full_squares, rel=1e-6), name


def test_bf16_with_fp32_accumulation_is_bound_through_bf16_optimizer(ranks):
    assert ranks[0]["coverage"]["zero1_bf16"]["zero_optimizer"] == "BF16_Optimizer"


@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_training_moves_every_layer(references, optimizer_name):
    # Guards the agreement test against step sizes too small for wrong norms to show.
    initial = tiny_training.initial_parameters()
    final = references[optimizer_name].params
    for name, start in initial.items():
        moved = float((final[name] - start).norm() / final[name].norm())
        assert moved > 5e-3, f"{name} moved only {moved:.1e}"


@pytest.mark.parametrize("setting", ["ddp", *SHARDED_SETTINGS])
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_parallel_training_matches_one_process(ranks, references, setting, optimizer_name):
    params = ranks[0]["params"][setting, optimizer_name]
    for name, tensor in params.items():
        assert torch.equal(tensor, ranks[1]["params"][setting, optimizer_name][name])
    error, layer = tiny_training.worst_relative_error(params, references[optimizer_name].params)
    assert error < TOLERANCE, f"{setting}/{optimizer_name}: {layer} off by {error:.2e}"


@pytest.mark.parametrize("setting", SHARDED_SETTINGS)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_every_rank_holds_every_layers_statistics(ranks, setting, optimizer_name):
    # The step's norm all-reduce gives each rank every layer's whole norms: no gather at a log step.
    reference = tiny_training.reference_layer_stats(optimizer_name)
    for rank in ranks:
        stats = rank["checkpoint"][setting, optimizer_name]["layer_stats"]
        tiny_training.assert_layer_stats_match(stats, reference, rel=TOLERANCE)


@pytest.mark.parametrize("setting", zero_worker.NAIVE_SETTINGS)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_shard_local_norms_fail_the_agreement(ranks, references, setting, optimizer_name):
    params = ranks[0]["naive"][setting, optimizer_name]
    error, _ = tiny_training.worst_relative_error(params, references[optimizer_name].params)
    assert error > 100 * TOLERANCE


@pytest.mark.parametrize("setting", SHARDED_SETTINGS)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_one_all_reduce_per_step_call(ranks, setting, optimizer_name):
    for rank_results in ranks:
        counts = dict(rank_results["collectives"][setting, optimizer_name])
        step_calls = counts.pop("step_calls")
        # DeepSpeed calls step() once per parameter group (ZeRO-1/2) or sub-group (ZeRO-3).
        assert step_calls >= 2 * tiny_training.NUM_STEPS
        assert counts == {"all_reduce": step_calls}


@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_no_collective_when_nothing_is_sharded(ranks, optimizer_name):
    counts = ranks[0]["collectives"]["ddp", optimizer_name]
    assert counts == {"step_calls": tiny_training.NUM_STEPS}


def test_unbound_optimizer_under_zero_raises_a_clear_error(ranks):
    message = ranks[0]["unbound_error"]
    assert "no layout describes it" in message
    assert "bind_zero" in message


def test_bind_zero_outcomes(ranks):
    outcomes = ranks[0]["bind_zero"]
    assert outcomes["stage0"] == "None"  # ZeRO-0 steps whole parameters: nothing to bind
    assert outcomes["sgd_client"].startswith("TypeError: bind_zero: the client optimizer SGD")
    assert outcomes["plain_module"].startswith("TypeError: bind_zero: no DeepSpeed ZeRO")


def test_checkpoint_layout_without_a_bound_one(ranks):
    for rank_results in ranks:
        outcomes = rank_results["bind_zero"]
        # ZeRO-0: the client steps the model's parameters, saved as whole layers.
        assert (
            outcomes["stage0_checkpoint_layout"] == "sharded=False layers=8 stepped_parameters=True"
        )
        # An element-wise client under ZeRO-2: the layout is built from the engine.
        assert outcomes["sgd_checkpoint_layout"] == "sharded=True layers=8 partitions=True"


@pytest.mark.parametrize("setting", SHARDED_SETTINGS)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_checkpoint_saves_through_the_bound_layout(ranks, setting, optimizer_name):
    for rank_results in ranks:
        assert rank_results["checkpoint"][setting, optimizer_name]["same_layout"]


@pytest.mark.parametrize("setting", SHARDED_SETTINGS)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_sharded_checkpoint_loads_on_one_process(ranks, references, setting, optimizer_name):
    # The pieces' layer offsets come from the partition geometry alone, with no collective: the two
    # ranks' saved runs must tile every layer and rebuild the trained master weights exactly.
    payloads = [r["checkpoint"][setting, optimizer_name]["layers"] for r in ranks]
    tiny_training.assert_restores_on_one_process(
        optimizer_name,
        payloads,
        ranks[0]["params"][setting, optimizer_name],
        references[optimizer_name],
    )
