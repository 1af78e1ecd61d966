"""The checkpoint collectives over a real gloo process group (``torch_collectives``): the
all-to-all that sends each rank its pieces at a resume on another world size delivers every
object to the rank it was addressed to, tensors bitwise, ``None`` as nothing."""

import pytest
import torch
from multiproc import run_ranks

from tvlars_scale.checkpoint.collectives import torch_collectives

pytestmark = pytest.mark.distributed

WORLD = 3


def _sent(source: int, destination: int):
    """What ``source`` sends ``destination``: nothing on the diagonal's neighbour, else a run."""
    if (source + 1) % WORLD == destination:
        return None
    values = torch.arange(source * 10 + destination + 1, dtype=torch.float32) / 7
    return [{"layer": f"l{source}", "offset": destination, "weights": values}]


def exchange() -> dict:
    collectives = torch_collectives(torch.device("cpu"))
    rank = collectives.rank
    received = collectives.all_to_all([_sent(rank, d) for d in range(WORLD)])
    gathered = collectives.gather(rank * 2)
    broadcast = collectives.broadcast({"from": rank})
    maximum = collectives.all_reduce_max(torch.tensor([rank, -rank], dtype=torch.int64))
    return {"received": received, "gathered": gathered, "broadcast": broadcast, "max": maximum}


def test_all_to_all_gather_broadcast_and_max_over_gloo():
    results = run_ranks(exchange, world_size=WORLD)
    for rank, result in enumerate(results):
        assert len(result["received"]) == WORLD
        for source, got in enumerate(result["received"]):
            expected = _sent(source, rank)
            if expected is None:
                assert got is None
                continue
            assert [r["layer"] for r in got] == [r["layer"] for r in expected]
            assert got[0]["offset"] == rank
            assert torch.equal(got[0]["weights"], expected[0]["weights"])
        assert result["gathered"] == ([0, 2, 4] if rank == 0 else None)
        assert result["broadcast"] == {"from": 0}
        assert result["max"].tolist() == [WORLD - 1, 0]
