"""step() under DeepSpeed's call pattern: one plan per parameter group, no tensor built from host data
once every group has stepped (on an accelerator each such tensor is a host-to-device copy, a sync)."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
import torch.distributed as dist

from tvlars_scale.optim import LAMB, LARS, TVLARS
from tvlars_scale.optim.sharding import Piece, ShardedLayout, TensorLayout

# Every way to make a device tensor out of host (Python or NumPy) data.
HOST_DATA_CONSTRUCTORS = ("tensor", "as_tensor", "from_numpy")


@contextlib.contextmanager
def one_rank_process_group():
    """A one-rank gloo group: the sharded path's all-reduce runs for real, with nothing to add."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def count_host_data_tensors(monkeypatch):
    counts = Counter()

    def counting(name, original):
        def construct(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        return construct

    for name in HOST_DATA_CONSTRUCTORS:
        monkeypatch.setattr(torch, name, counting(name, getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_tensor", counting("new_tensor", torch.Tensor.new_tensor))
    yield counts
    monkeypatch.undo()


def zero_like_groups(factory):
    """Two parameter groups of one flat partition each, as ZeRO-1/2 hand their client optimizer: a
    4x3 layer and a bias in group 0, a 5x2 layer in group 1; the layout names them."""
    gen = torch.Generator().manual_seed(0)
    flats = [torch.randn(15, generator=gen), torch.randn(10, generator=gen)]
    optimizer = factory([{"params": [flats[0]]}, {"params": [flats[1]]}])
    layout = ShardedLayout(
        ["a.weight", "a.bias", "b.weight"],
        [(4, 3), (3,), (5, 2)],
        [
            (flats[0], TensorLayout((0, 1), (Piece(0, 0, 12, 0), Piece(1, 12, 3, 0)))),
            (flats[1], TensorLayout((2,), (Piece(2, 0, 10, 0),))),
        ],
    )
    optimizer.bind_layout(layout)
    return optimizer, flats


def deepspeed_step(optimizer, flats, gen):
    """ZeRO-1/2's ``_optimizer_step``: step() once per group, each time with only that group."""
    groups = optimizer.param_groups
    for index, flat in enumerate(flats):
        flat.grad = torch.randn(flat.shape, generator=gen)
        optimizer.param_groups = [groups[index]]
        optimizer.step()
        optimizer.param_groups = groups


@pytest.mark.parametrize(
    "factory",
    [
        lambda p: TVLARS(p, lr=1.0, exclude_1d=False),
        lambda p: LARS(p, lr=1.0, exclude_1d=False),
        lambda p: LAMB(p, lr=1e-2, exclude_1d=False),
    ],
    ids=["tvlars", "lars", "lamb"],
)
def test_steps_after_the_first_build_no_tensor_from_host_data(factory, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    with one_rank_process_group():
        optimizer, flats = zero_like_groups(factory)
        deepspeed_step(optimizer, flats, gen)  # the first call of each group builds its plan
        with count_host_data_tensors(monkeypatch) as counts:
            for _ in range(3):
                deepspeed_step(optimizer, flats, gen)
    assert sum(counts.values()) == 0, dict(counts)
    assert len(optimizer._plans) == 2  # one per parameter group
    assert all(optimizer.state[flat]["step"] == 4 for flat in flats)
    assert set(optimizer.layer_stats()) == {"a.weight", "a.bias", "b.weight"}


def test_a_rank_holding_only_padding_steps_and_records_every_layer():
    # ZeRO-1/2 at a large world size: the last ranks' partitions hold only the padded tail.
    padding = torch.zeros(4)
    padding.grad = torch.zeros(4)
    optimizer = TVLARS([padding], lr=1.0)
    layout = ShardedLayout(
        ["a.weight", "a.bias"], [(4, 3), (3,)], [(padding, TensorLayout((0, 1), ()))]
    )
    optimizer.bind_layout(layout)
    with one_rank_process_group():
        optimizer.step()
    assert optimizer.state[padding]["step"] == 1
    assert set(optimizer.layer_stats()) == {"a.weight", "a.bias"}
    assert torch.equal(padding, torch.zeros(4))
