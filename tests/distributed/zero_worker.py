"""What each rank runs for test_zero_sharding.py: every setting and optimizer in ONE launch, since
starting the processes and DeepSpeed's first initialisation cost far more than the training."""

from __future__ import annotations

import contextlib
from collections import Counter
from types import SimpleNamespace

import tiny_training
import torch
import torch.distributed as dist

from tvlars_scale.checkpoint.checkpointer import Checkpointer
from tvlars_scale.checkpoint.layer_state import capture_layer_state
from tvlars_scale.optim.zero_layout import bind_zero

ZERO_SETTINGS = {
    "zero1": (1, {}),
    "zero1_parameter_alignment": (1, {"parameter_alignment": True}),
    "zero2": (2, {}),
    "zero2_round_robin": (2, {"round_robin_gradients": True}),
    "zero3": (3, {}),
    # Small sub-groups: ZeRO-3 then calls step() once per sub-group, several per parameter group.
    "zero3_sub_groups": (3, {"sub_group_size": 100}),
}
NAIVE_SETTINGS = ("zero2", "zero3")

# Everything torch.distributed offers that moves data between ranks.
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "irecv",
    "isend",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "send",
)


@contextlib.contextmanager
def count_collectives(optimizer: torch.optim.Optimizer):
    """Count the ``step()`` calls of ``optimizer`` and the collectives issued inside them."""
    counts = Counter()
    inside_step = False
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name):
        def collective(*args, **kwargs):
            if inside_step:
                counts[name] += 1
            return originals[name](*args, **kwargs)

        return collective

    step = optimizer.step

    def counted_step(*args, **kwargs):
        nonlocal inside_step
        counts["step_calls"] += 1
        inside_step = True
        try:
            return step(*args, **kwargs)
        finally:
            inside_step = False

    for name in COLLECTIVES:
        setattr(dist, name, counting(name))
    optimizer.step = counted_step  # DeepSpeed looks the method up on the instance at every step
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        del optimizer.step


def checkpointer_of(engine, optimizer) -> Checkpointer:
    """The trainer's Checkpointer for a DeepSpeed engine (an Accelerator reduced to what it reads)."""
    from accelerate.utils import DistributedType

    accelerator = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        unwrap_model=lambda model: model.module,
        process_index=dist.get_rank(),
    )
    return Checkpointer(accelerator, engine, optimizer, None, ".", keep_last=1)


def run_zero(optimizer_name: str, stage: int, zero_overrides: dict, naive: bool = False):
    """Train under ZeRO; return the gathered parameters, the collectives counted in step(), the
    layers of each ZeRO-1/2 partition, and what the Checkpointer saves of the optimizer state."""
    import deepspeed

    model, optimizer = tiny_training.make_model_and_optimizer(optimizer_name)
    config = tiny_training.deepspeed_config(stage, **zero_overrides)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    layout = bind_zero(engine)
    if naive:
        # The naive design: the same pieces, but norms reduced over this rank only (a group of one),
        # i.e. every rank computes the trust ratio of its own shard of a layer.
        layout.process_group = dist.new_subgroups(group_size=1)[0]
    checkpointer = checkpointer_of(engine, optimizer)
    with count_collectives(optimizer) as counts:
        params = tiny_training.train_deepspeed(engine)
    saved = {
        "same_layout": checkpointer.layout is optimizer.layout is layout,
        "layers": capture_layer_state(optimizer, checkpointer.layout, owner=True),
        # What the trainer writes at a log step, held by each rank without a gather.
        "layer_stats": optimizer.layer_stats(),
    }
    return params, dict(counts), _layers_in_partition(engine), saved


def layout_coverage(stage: int, zero_overrides: dict, bf16: bool = False) -> dict:
    """Per layer: elements and squared norm the bound layout's pieces cover, summed over ranks, and
    the same of the full parameter as DeepSpeed gathers it; plus the ZeRO optimizer's class."""
    import deepspeed

    model, optimizer = tiny_training.make_model_and_optimizer("tvlars")
    config = tiny_training.deepspeed_config(stage, **zero_overrides)
    if bf16:  # fp32 gradient accumulation: DeepSpeed then partitions through BF16_Optimizer
        config["bf16"] = {"enabled": True}
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    layout = bind_zero(engine)
    covered = torch.zeros(2, len(layout.layer_names), dtype=torch.float64)
    for partition in _fp32_partitions(engine.optimizer):
        for piece in layout.of(partition).pieces:
            values = partition.detach().narrow(0, piece.start, piece.numel).double()
            covered[0, piece.layer] += piece.numel
            covered[1, piece.layer] += values.square().sum()
    # collective: sums what the ranks' pieces cover
    dist.all_reduce(covered)
    full = tiny_training.gather_parameters(engine.module)
    return {
        "zero_optimizer": type(engine.optimizer).__name__,
        "covered": dict(zip(layout.layer_names, covered.T.tolist(), strict=True)),
        "full": {name: [p.numel(), p.double().square().sum().item()] for name, p in full.items()},
    }


def _fp32_partitions(zero_optimizer) -> list[torch.Tensor]:
    """The flat tensors DeepSpeed hands the client optimizer (ZeRO-3 empties the client's param
    groups between steps, so they are read from DeepSpeed's side)."""
    for attribute in (
        "single_partition_of_fp32_groups",  # ZeRO-1/2
        "fp32_partitioned_groups_flat",  # ZeRO-3
        "fp32_groups_flat_partition",  # BF16_Optimizer
    ):
        if hasattr(zero_optimizer, attribute):
            return getattr(zero_optimizer, attribute)
    raise TypeError(type(zero_optimizer).__name__)


def run_ddp(optimizer_name: str):
    model, optimizer = tiny_training.make_model_and_optimizer(optimizer_name)
    with count_collectives(optimizer) as counts:
        params = tiny_training.train_ddp(model, optimizer)
    return params, dict(counts)


def _layers_in_partition(engine) -> list[list[str]] | None:
    """ZeRO-1/2: the names of the layers this rank's partition touches, from DeepSpeed's bookkeeping."""
    zero_optimizer = engine.optimizer
    if not hasattr(zero_optimizer, "params_in_partition"):
        return None
    return [
        [zero_optimizer.param_names[p] for p in params]
        for params in zero_optimizer.params_in_partition
    ]


def unbound_error() -> str:
    """The message of what a layer-wise optimizer raises when ZeRO steps it without a layout."""
    import deepspeed

    model, optimizer = tiny_training.make_model_and_optimizer("tvlars")
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=tiny_training.deepspeed_config(2)
    )
    try:
        tiny_training.train_deepspeed(engine)
    except RuntimeError as error:
        return str(error)
    return ""


def bind_zero_outcomes() -> dict[str, str]:
    """What bind_zero does with a ZeRO-0 engine, an element-wise client and a non-DeepSpeed object."""
    import deepspeed

    outcomes = {}
    model, optimizer = tiny_training.make_model_and_optimizer("tvlars")
    config = tiny_training.deepspeed_config(1)
    config["zero_optimization"]["stage"] = 0
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    outcomes["stage0"] = repr(bind_zero(engine))
    layout = checkpointer_of(engine, optimizer).layout
    outcomes["stage0_checkpoint_layout"] = (
        f"sharded={layout.sharded} layers={len(layout.layer_names)} "
        f"stepped_parameters={all(layout.of(p) is not None for p in model.parameters())}"
    )
    model = tiny_training.TinyCNN()
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        config=tiny_training.deepspeed_config(2),
    )
    # An element-wise client is not bound: the Checkpointer builds the layout from the engine.
    layout = checkpointer_of(engine, engine.optimizer.optimizer).layout
    partitions = engine.optimizer.single_partition_of_fp32_groups
    outcomes["sgd_checkpoint_layout"] = (
        f"sharded={layout.sharded} layers={len(layout.layer_names)} "
        f"partitions={all(layout.of(p) is not None for p in partitions)}"
    )
    for label, obj in (("sgd_client", engine), ("plain_module", model)):
        try:
            bind_zero(obj)
            outcomes[label] = "no error"
        except TypeError as error:
            outcomes[label] = f"TypeError: {error}"
    return outcomes


def all_settings() -> dict:
    results = {
        "params": {},
        "collectives": {},
        "partition_layers": {},
        "naive": {},
        "checkpoint": {},
    }
    for optimizer_name in tiny_training.OPTIMIZER_SETTINGS:
        params, counts = run_ddp(optimizer_name)
        results["params"]["ddp", optimizer_name] = params
        results["collectives"]["ddp", optimizer_name] = counts
        for setting, (stage, overrides) in ZERO_SETTINGS.items():
            params, counts, layers, saved = run_zero(optimizer_name, stage, overrides)
            results["params"][setting, optimizer_name] = params
            results["collectives"][setting, optimizer_name] = counts
            results["partition_layers"][setting] = layers
            results["checkpoint"][setting, optimizer_name] = saved
        for setting in NAIVE_SETTINGS:
            stage, overrides = ZERO_SETTINGS[setting]
            params, _, _, _ = run_zero(optimizer_name, stage, overrides, naive=True)
            results["naive"][setting, optimizer_name] = params
    results["coverage"] = {
        setting: layout_coverage(stage, overrides)
        for setting, (stage, overrides) in ZERO_SETTINGS.items()
    }
    results["coverage"]["zero1_bf16"] = layout_coverage(1, {}, bf16=True)
    results["bind_zero"] = bind_zero_outcomes()
    results["unbound_error"] = unbound_error()  # last: it leaves its engine mid-step
    return results
