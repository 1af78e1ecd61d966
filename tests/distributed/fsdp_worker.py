"""What each rank runs for test_fsdp2_sharding.py: every optimizer (and the failure cases) in ONE
launch per mesh, since starting the processes costs more than the training.

The model is sharded the torchtitan way: ``fully_shard`` first, the optimizer built on the DTensor
parameters afterwards, then ``bind_fsdp``. A 1-D mesh is plain FSDP2; a ``(replicate, shard)`` mesh
is HSDP (parameters placed ``(Replicate(), Shard(0))``).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter

import tiny_training
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode
from zero_worker import count_collectives

from tvlars_scale.checkpoint.layer_state import capture_layer_state, restore_layer_state
from tvlars_scale.nonfinite import gradients_are_finite
from tvlars_scale.optim import bind_fsdp, build_optimizer
from tvlars_scale.optim.fsdp_layout import fsdp_layout

MESHES = {"fsdp2": (2,), "fsdp3": (3,), "hsdp2x2": (2, 2)}
"""Every mesh runs in ONE launch of ``WORLD_SIZE`` processes: a mesh of fewer ranks uses the first
ones, the others wait (process groups are created by every rank of the world)."""
WORLD_SIZE = 4
NAIVE_MESHES = ("fsdp2", "fsdp3")


def make_mesh(shape: tuple[int, ...]) -> DeviceMesh:
    """Ranks ``0 .. prod(shape) - 1`` in row-major order; every rank of the world must call it."""
    names = ("replicate", "shard")[-len(shape) :]
    ranks = torch.arange(math.prod(shape)).reshape(shape)
    return DeviceMesh("cpu", ranks, mesh_dim_names=names)


def sharded_model(mesh: DeviceMesh):
    torch.manual_seed(0)
    model = tiny_training.TinyCNN()
    fully_shard(model, mesh=mesh)  # a 2-D mesh makes it HSDP: (Replicate(), Shard(0))
    return model


def make_sharded(optimizer_name: str, mesh: DeviceMesh, *, bind: bool = True):
    """The torchtitan order: shard, then build the optimizer on the DTensors, then bind."""
    model = sharded_model(mesh)
    optimizer = build_optimizer(
        optimizer_name, model, **tiny_training.OPTIMIZER_SETTINGS[optimizer_name]
    )
    if bind:
        bind_fsdp(optimizer, model)
    return model, optimizer


@contextlib.contextmanager
def count_step_collectives(optimizer):
    """Collectives inside ``step()``: torch.distributed's (patched) and DTensor's functional ones,
    which go through the dispatcher (CommDebugMode sees both kinds there)."""
    dispatched = Counter()
    step = optimizer.step

    def counted(*args, **kwargs):
        with CommDebugMode() as mode:
            result = step(*args, **kwargs)
        for op, n in mode.get_comm_counts().items():
            dispatched[str(op)] += n
        return result

    optimizer.step = counted
    with count_collectives(optimizer) as counts:
        yield counts, dispatched
    # count_collectives removes the instance attribute (both wrappers) on exit


def train_fsdp(model, optimizer, num_ranks: int) -> dict[str, torch.Tensor]:
    """``NUM_STEPS`` steps of ``GRAD_ACCUM_STEPS`` micro-batches; gradients reduced at the last.
    Data-parallel rank ``r`` (the global rank: meshes start at rank 0) takes chunk ``r``."""
    images, labels = tiny_training.make_data(num_ranks)
    rank = dist.get_rank()
    for step in range(tiny_training.NUM_STEPS):
        for micro_step in range(tiny_training.GRAD_ACCUM_STEPS):
            # collective: FSDP2 reduce-scatters (HSDP: and all-reduces) at the last micro-batch only
            model.set_requires_gradient_sync(micro_step == tiny_training.GRAD_ACCUM_STEPS - 1)
            loss = F.cross_entropy(
                model(images[step, micro_step, rank]), labels[step, micro_step, rank]
            )
            (loss / tiny_training.GRAD_ACCUM_STEPS).backward()
        optimizer.step()
        optimizer.zero_grad()
    return full_parameters(model)


def full_parameters(model) -> dict[str, torch.Tensor]:
    # collective: one all-gather per parameter
    return {name: p.detach().full_tensor().clone() for name, p in model.named_parameters()}


def run_mesh(mesh_name: str) -> dict:
    """Every optimizer on one mesh: trained parameters, collectives per step(), the saved layer
    state; on ``NAIVE_MESHES`` also the same training with shard-local norms. Ranks outside the
    mesh return ``None`` (after joining every group creation)."""
    shape = MESHES[mesh_name]
    num_ranks = math.prod(shape)
    mesh = make_mesh(shape)
    member = dist.get_rank() < num_ranks
    results = {
        "params": {},
        "collectives": {},
        "dispatched": {},
        "layers": {},
        "layer_stats": {},
        "naive": {},
    }
    for name in tiny_training.OPTIMIZER_SETTINGS:
        if member:
            model, optimizer = make_sharded(name, mesh)
            with count_step_collectives(optimizer) as (counts, dispatched):
                results["params"][name] = train_fsdp(model, optimizer, num_ranks)
            results["collectives"][name] = dict(counts)
            results["dispatched"][name] = dict(dispatched)
            layout = optimizer.layout  # HSDP: one replica of the shards saves them
            results["layers"][name] = capture_layer_state(
                optimizer, layout, owner=layout.replica_rank == 0
            )
            # host sync: the last step's per-layer norms and trust ratios, as the trainer logs them.
            results["layer_stats"][name] = optimizer.layer_stats()
        if mesh_name in NAIVE_MESHES:
            # The naive design: the same pieces, norms reduced over this rank alone (a group of
            # one), i.e. each rank takes the trust ratio of its own rows of a layer.
            alone = dist.new_subgroups(group_size=1)[0]  # every rank of the world creates it
            if member:
                model, optimizer = make_sharded(name, mesh)
                optimizer.layout.process_group = alone
                results["naive"][name] = train_fsdp(model, optimizer, num_ranks)
    if not member:
        return None
    results["geometry"] = geometry(mesh)
    results["failures"] = failures(mesh, num_ranks)
    return results


def geometry(mesh: DeviceMesh) -> dict:
    """Per layer, this rank's rows and pieces, and the ranks the norms reduce over."""
    model = sharded_model(mesh)
    optimizer = build_optimizer("lars", model, lr=0.1, weight_decay=0.0)
    layout = fsdp_layout(optimizer, model)
    rows, pieces = {}, {}
    for p, entry in layout.items():
        name = layout.layer_names[entry.layers[0]]
        rows[name] = p.to_local().shape[0]
        pieces[name] = [(piece.layer_offset, piece.numel) for piece in entry.pieces]
    return {
        "rows": rows,
        "pieces": pieces,
        "norm_group_ranks": dist.get_process_group_ranks(layout.process_group),
        "replica_rank": layout.replica_rank,
        "placements": str(next(iter(model.parameters())).placements),
    }


def failures(mesh: DeviceMesh, num_ranks: int) -> dict[str, str]:
    """What an unbound optimizer does with sharded DTensors, and what bind_fsdp refuses."""
    outcomes = {}
    model, optimizer = make_sharded("tvlars", mesh, bind=False)
    images, labels = tiny_training.make_data(num_ranks)
    rank = dist.get_rank()
    F.cross_entropy(model(images[0, 0, rank]), labels[0, 0, rank]).backward()
    try:
        optimizer.step()
        outcomes["unbound"] = "no error"
    except RuntimeError as error:
        outcomes["unbound"] = str(error)
    # The trainer's NaN/Inf check on sharded gradients: one rank's NaN stops every rank's step.
    outcomes["finite"] = gradients_are_finite(model.parameters())
    if rank == num_ranks - 1:
        model.conv2.weight.grad._local_tensor.view(-1)[0] = float(
            "nan"
        )  # 8 rows: every rank has some
    outcomes["nan_on_last_rank"] = gradients_are_finite(model.parameters())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        bind_fsdp(sgd, model)
        outcomes["sgd"] = "no error"
    except TypeError as error:
        outcomes["sgd"] = f"TypeError: {error}"
    plain_model, plain_optimizer = tiny_training.make_model_and_optimizer("lars")
    try:
        bind_fsdp(plain_optimizer, plain_model)
        outcomes["plain"] = "no error"
    except TypeError as error:
        outcomes["plain"] = f"TypeError: {error}"
    return outcomes


def restore_into_fsdp(mesh_name: str, optimizer_name: str) -> dict | None:
    """Train one process (the reference), save its layer state, load it into a bound FSDP2
    optimizer on ``mesh_name``; return the gathered parameters and optimizer state."""
    from tvlars_scale.checkpoint.layer_state import unsharded_layout

    mesh = make_mesh(MESHES[mesh_name])
    if dist.get_rank() >= mesh.size():
        return None
    model, optimizer = tiny_training.make_model_and_optimizer(optimizer_name)
    images, labels = tiny_training.make_data(1)
    for step in range(3):
        F.cross_entropy(model(images[step, 0, 0]), labels[step, 0, 0]).backward()
        optimizer.step()
        optimizer.zero_grad()
    saved = capture_layer_state(optimizer, unsharded_layout(model, optimizer), owner=True)
    expected = {
        name: {"param": p.detach().clone(), **optimizer.state[p]}
        for name, p in model.named_parameters()
    }
    model, optimizer = make_sharded(optimizer_name, mesh)
    with torch.no_grad():
        restore_layer_state(optimizer, optimizer.layout, [saved])
    restored = {}
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        restored[name] = {
            "param": p.detach().full_tensor(),  # collective: all-gather
            **{
                key: value.full_tensor() if isinstance(value, DTensor) else value
                for key, value in state.items()
            },
        }
    return {"expected": expected, "restored": restored}


def all_cases() -> dict:
    results = {name: run_mesh(name) for name in MESHES}
    results["restored"] = restore_into_fsdp("fsdp3", "lamb")
    return results
