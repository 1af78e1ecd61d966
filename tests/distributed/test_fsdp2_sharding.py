"""Layer-wise optimizers under PyTorch FSDP2 (``fully_shard``, real gloo ranks) train like one process
holding the whole batch, with one all-reduce per step() over the shard dimension: FSDP2 on 2 and on
3 ranks (uneven row shards, a layer with fewer rows than ranks) and HSDP on a 2 x 2 mesh, and report
the one process's per-layer norms. Shard-local norms fail the same comparison; an unbound optimizer
refuses sharded DTensors; the per-layer checkpoint state moves between FSDP2 and one process both
ways."""

import fsdp_worker
import pytest
import tiny_training
import torch
from multiproc import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TOLERANCE = 1e-5  # relative, fp32: the bar of the ZeRO tests
OPTIMIZERS = list(tiny_training.OPTIMIZER_SETTINGS)
MESHES = list(fsdp_worker.MESHES)


@pytest.fixture(scope="module")
def ranks():
    """Every rank's results of every mesh and optimizer, from ONE launch of 4 processes."""
    return run_ranks(fsdp_worker.all_cases, world_size=fsdp_worker.WORLD_SIZE)


def num_ranks(mesh: str) -> int:
    shape = fsdp_worker.MESHES[mesh]
    return shape[0] * (shape[1] if len(shape) > 1 else 1)


@pytest.fixture(scope="module")
def references():
    return {
        (name, n): tiny_training.train_reference_run(name, n)
        for name in OPTIMIZERS
        for n in sorted({num_ranks(mesh) for mesh in MESHES})
    }


def members(ranks, mesh):
    return [r[mesh] for r in ranks[: num_ranks(mesh)]]


def test_the_meshes_exercise_the_edge_cases(ranks):
    three = [r["geometry"] for r in members(ranks, "fsdp3")]
    # Uneven shards: conv2.weight's 8 rows on 3 ranks are 3 + 3 + 2, and logit_scale's one row
    # leaves two ranks nothing; pieces tile each layer in rank order.
    assert [g["rows"]["conv2.weight"] for g in three] == [3, 3, 2]
    assert [g["rows"]["logit_scale"] for g in three] == [1, 0, 0]
    assert [g["pieces"]["conv2.weight"] for g in three] == [[(0, 108)], [(108, 108)], [(216, 72)]]
    assert three[2]["pieces"]["logit_scale"] == []
    for mesh in ("fsdp2", "fsdp3"):
        for g in (r["geometry"] for r in members(ranks, mesh)):
            assert g["placements"] == "(Shard(dim=0),)"
            assert g["norm_group_ranks"] == list(range(num_ranks(mesh)))
    # HSDP: replicas (ranks r and r + 2) hold the same rows; norms reduce over the shard pair only.
    hsdp = [r["geometry"] for r in members(ranks, "hsdp2x2")]
    assert hsdp[0]["placements"] == "(Replicate(), Shard(dim=0))"
    assert [g["norm_group_ranks"] for g in hsdp] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert hsdp[0]["pieces"] == hsdp[2]["pieces"] != hsdp[1]["pieces"]
    assert [g["replica_rank"] for g in hsdp] == [0, 0, 1, 1]


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_fsdp2_training_matches_one_process(ranks, references, mesh, optimizer_name):
    results = members(ranks, mesh)
    params = results[0]["params"][optimizer_name]
    for other in results[1:]:
        for name, tensor in params.items():
            assert torch.equal(tensor, other["params"][optimizer_name][name]), name
    reference = references[optimizer_name, num_ranks(mesh)].params
    error, layer = tiny_training.worst_relative_error(params, reference)
    assert error < TOLERANCE, f"{mesh}/{optimizer_name}: {layer} off by {error:.2e}"


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_every_rank_holds_every_layers_statistics(ranks, references, mesh, optimizer_name):
    # The step's norm all-reduce gives each rank every layer's whole norms: no gather at a log step.
    # Compared as values, not ratios: a wrong reduction group (HSDP reduced over both replicas)
    # scales both norms alike, which the trust ratio's quotient would hide.
    reference = references[optimizer_name, num_ranks(mesh)].stats
    for result in members(ranks, mesh):
        stats = result["layer_stats"][optimizer_name]
        tiny_training.assert_layer_stats_match(stats, reference, rel=TOLERANCE)


@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_training_moves_every_layer(references, optimizer_name):
    # Guards the agreement test against step sizes too small for wrong norms to show.
    initial = tiny_training.initial_parameters()
    final = references[optimizer_name, 2].params
    for name, start in initial.items():
        moved = float((final[name] - start).norm() / final[name].norm())
        assert moved > 5e-3, f"{name} moved only {moved:.1e}"


@pytest.mark.parametrize("mesh", fsdp_worker.NAIVE_MESHES)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_shard_local_norms_fail_the_agreement(ranks, references, mesh, optimizer_name):
    params = ranks[0][mesh]["naive"][optimizer_name]
    reference = references[optimizer_name, num_ranks(mesh)].params
    error, _ = tiny_training.worst_relative_error(params, reference)
    assert error > 100 * TOLERANCE


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_one_all_reduce_per_step_call(ranks, mesh, optimizer_name):
    for results in members(ranks, mesh):
        counts = dict(results["collectives"][optimizer_name])
        assert counts.pop("step_calls") == tiny_training.NUM_STEPS  # FSDP2 calls step() itself
        assert counts == {"all_reduce": tiny_training.NUM_STEPS}
        # Through the dispatcher as well: no DTensor collective (a per-parameter norm) either.
        assert results["dispatched"][optimizer_name] == {"c10d.allreduce_": tiny_training.NUM_STEPS}


@pytest.mark.parametrize("mesh", MESHES)
def test_unbound_optimizer_refuses_sharded_dtensors(ranks, mesh):
    for results in members(ranks, mesh):
        outcomes = results["failures"]
        assert "stepping a sharded DTensor (FSDP2)" in outcomes["unbound"]
        assert "bind_fsdp" in outcomes["unbound"]
        assert outcomes["sgd"].startswith("TypeError: bind_fsdp: the optimizer SGD")
        assert "is not a sharded DTensor" in outcomes["plain"]
        assert outcomes["finite"] is True and outcomes["nan_on_last_rank"] is False


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_fsdp2_checkpoint_loads_on_one_process(ranks, references, mesh, optimizer_name):
    # Every rank's payload, as the trainer writes them: HSDP's second replica saves nothing.
    payloads = [r["layers"][optimizer_name] for r in members(ranks, mesh)]
    tiny_training.assert_restores_on_one_process(
        optimizer_name,
        payloads,
        ranks[0][mesh]["params"][optimizer_name],
        references[optimizer_name, num_ranks(mesh)],
    )
