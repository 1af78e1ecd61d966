"""ZeRO-2 and FSDP2 checkpoints saved by 4 real gloo ranks, restored on 4 (bitwise: the same
parameters and the same saved pieces, each rank opening its own rank file only) and on 3 (layers
cut elsewhere: equal to the unsharded reference, each saved file opened by one rank, the pieces
sent on by the all-to-all)."""

import math

import checkpoint_worker
import pytest
import tiny_training
import torch
from multiproc import run_ranks

from tvlars_scale.checkpoint.layer_state import restore_layer_state, unsharded_layout

# Two launches of 4 processes (DeepSpeed and FSDP2 in each) and one of 3: minutes, not seconds.
pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.long]

SAVED_RANKS = 4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs")
    return run_dir, run_ranks(checkpoint_worker.save, str(run_dir), world_size=SAVED_RANKS)


def _unsharded(payloads: list[dict]):
    """Every rank's saved pieces restored into one process: the unsharded reference."""
    model, optimizer = tiny_training.make_model_and_optimizer("tvlars")
    restore_layer_state(optimizer, unsharded_layout(model, optimizer), payloads)
    return model, optimizer


def _assert_same(restored: list[dict], saved: list[dict], setting: str) -> None:
    """The pieces of ``restored`` ranks, merged in one process, equal the ``saved`` ones'."""
    expected, expected_optimizer = _unsharded([rank[setting]["layers"] for rank in saved])
    got, got_optimizer = _unsharded([rank[setting]["layers"] for rank in restored])
    for (name, p), q in zip(expected.named_parameters(), got.parameters(), strict=True):
        assert torch.equal(p, q), name
        assert torch.equal(p, saved[0][setting]["params"][name]), name
        for key, value in expected_optimizer.state[p].items():
            other = got_optimizer.state[q][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


@pytest.fixture(scope="module")
def restored(saved):
    """Every setting restored on ``world_size`` ranks, in ONE launch per world size."""
    run_dir, _ = saved
    launches = {}

    def on(world_size: int) -> list[dict]:
        if world_size not in launches:
            launches[world_size] = run_ranks(
                checkpoint_worker.restore, str(run_dir), world_size=world_size
            )
        return launches[world_size]

    return on


@pytest.mark.parametrize("setting", checkpoint_worker.SETTINGS)
def test_same_world_size_restores_bitwise_from_its_own_file(saved, restored, setting):
    _, saved_ranks = saved
    ranks = restored(SAVED_RANKS)
    for rank, (before, after) in enumerate(zip(saved_ranks, ranks, strict=True)):
        assert after[setting]["opened"] == [f"rank-{rank:05d}.pt"]
        for name, value in before[setting]["params"].items():
            assert torch.equal(after[setting]["params"][name], value), name
        _assert_payloads_equal(before[setting]["layers"], after[setting]["layers"])
    _assert_same(ranks, saved_ranks, setting)


@pytest.mark.parametrize("setting", checkpoint_worker.SETTINGS)
def test_fewer_ranks_restore_the_unsharded_reference_each_file_read_once(saved, restored, setting):
    _, saved_ranks = saved
    ranks = restored(3)
    for rank in ranks:
        opened = rank[setting]["opened"]
        assert len(opened) <= math.ceil(SAVED_RANKS / 3)
        for name, value in saved_ranks[0][setting]["params"].items():
            assert torch.equal(rank[setting]["params"][name], value), name
    # Each saved file opened by one rank only; the pieces travel by the all-to-all.
    opened = sorted(name for rank in ranks for name in rank[setting]["opened"])
    assert opened == [f"rank-{r:05d}.pt" for r in range(SAVED_RANKS)]
    _assert_same(ranks, saved_ranks, setting)


def _assert_payloads_equal(a: dict, b: dict) -> None:
    assert a["shapes"] == b["shapes"] and a["scalars"].keys() == b["scalars"].keys()
    assert len(a["runs"]) == len(b["runs"])
    for x, y in zip(a["runs"], b["runs"], strict=True):
        assert (x["layer"], x["offset"], x["numel"]) == (y["layer"], y["offset"], y["numel"])
        assert torch.equal(x["weights"], y["weights"]), x["layer"]
        for key, value in x["state"].items():
            assert torch.equal(value, y["state"][key]), (x["layer"], key)
