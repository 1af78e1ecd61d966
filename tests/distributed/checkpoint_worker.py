"""What each rank runs for test_checkpoint_scale.py: a ZeRO-2 and an FSDP2 checkpoint saved by the
trainer's Checkpointer on one number of ranks, restored on the same or another number.

Saving trains the tiny CNN for ``NUM_STEPS`` steps first; restoring starts from the untrained model,
so anything not restored shows. Each rank records which rank files it opened while restoring.
"""

from __future__ import annotations

import builtins
import contextlib
import re
from pathlib import Path
from types import SimpleNamespace

import fsdp_worker
import tiny_training
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.utils import DistributedType

from tvlars_scale.checkpoint.checkpointer import Checkpointer
from tvlars_scale.checkpoint.collectives import torch_collectives
from tvlars_scale.checkpoint.directory import find_latest_complete
from tvlars_scale.checkpoint.layer_state import capture_layer_state

SETTINGS = ("zero2", "fsdp2")
_RANK_FILE = re.compile(r"rank-\d+\.pt$")


def _zero2(world_size: int):
    import deepspeed

    from tvlars_scale.optim.zero_layout import bind_zero

    model, optimizer = tiny_training.make_model_and_optimizer("tvlars")
    config = tiny_training.deepspeed_config(2)
    config["train_batch_size"] = (
        tiny_training.MICRO_BATCH_SIZE * tiny_training.GRAD_ACCUM_STEPS * world_size
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    bind_zero(engine)
    return engine, optimizer, lambda wrapped: wrapped.module, DistributedType.DEEPSPEED


def _fsdp2(world_size: int):
    model, optimizer = fsdp_worker.make_sharded("tvlars", fsdp_worker.make_mesh((world_size,)))
    return model, optimizer, lambda wrapped: wrapped, DistributedType.FSDP


def _train_zero2(engine, world_size: int) -> None:
    images, labels = tiny_training.make_data(world_size)
    rank = dist.get_rank()
    for step in range(tiny_training.NUM_STEPS):
        for micro_step in range(tiny_training.GRAD_ACCUM_STEPS):
            x, y = images[step, micro_step, rank], labels[step, micro_step, rank]
            engine.backward(F.cross_entropy(engine(x), y))
            engine.step()


def _checkpointer(setting: str, run_dir: Path):
    world_size, rank = dist.get_world_size(), dist.get_rank()
    model, optimizer, unwrap, kind = (_zero2 if setting == "zero2" else _fsdp2)(world_size)
    accelerator = SimpleNamespace(
        distributed_type=kind,
        unwrap_model=unwrap,
        process_index=rank,
        num_processes=world_size,
        is_main_process=rank == 0,
        device=torch.device("cpu"),
    )
    task = SimpleNamespace(state_dict=dict, load_state_dict=lambda state: None)
    position = {"state": {"epoch": 1, "num_samples": 640}}
    train_state = SimpleNamespace(state_dict=lambda: position, load_state_dict=lambda state: None)
    checkpointer = Checkpointer(
        accelerator, model, optimizer, task, run_dir, keep_last=2, train_state=train_state
    )
    return model, optimizer, checkpointer


def _full_parameters(setting: str, model) -> dict[str, torch.Tensor]:
    if setting == "zero2":
        return tiny_training.gather_parameters(model.module)
    return fsdp_worker.full_parameters(model)


@contextlib.contextmanager
def _rank_files_opened():
    """The rank files this process opens inside the block (``builtins.open``, which the
    checkpoint's readers use)."""
    opened, original = [], builtins.open

    def counting(file, *args, **kwargs):
        if _RANK_FILE.search(str(file)):
            opened.append(Path(file).name)
        return original(file, *args, **kwargs)

    builtins.open = counting
    try:
        yield opened
    finally:
        builtins.open = original


def save(run_dir: str, settings: tuple[str, ...] = SETTINGS) -> dict:
    """Train and checkpoint each setting; the trained parameters and this rank's saved pieces."""
    results = {}
    for setting in settings:
        model, optimizer, checkpointer = _checkpointer(setting, Path(run_dir) / setting)
        if setting == "zero2":
            _train_zero2(model, dist.get_world_size())
        else:
            fsdp_worker.train_fsdp(model, optimizer, dist.get_world_size())
        checkpointer.save(tiny_training.NUM_STEPS)
        results[setting] = {
            "params": _full_parameters(setting, model),
            "layers": capture_layer_state(optimizer, checkpointer.layout, owner=True),
        }
    return results


def restore(run_dir: str, settings: tuple[str, ...] = SETTINGS) -> dict:
    """Restore each setting's checkpoint into the untrained model (rank 0 finds it and broadcasts
    it); the parameters, this rank's pieces and the rank files it opened."""
    results = {}
    for setting in settings:
        model, optimizer, checkpointer = _checkpointer(setting, Path(run_dir) / setting)
        found = find_latest_complete(Path(run_dir) / setting) if dist.get_rank() == 0 else None
        info = torch_collectives(torch.device("cpu")).broadcast(found)
        with _rank_files_opened() as opened:
            checkpointer.restore(info, print)
        results[setting] = {
            "params": _full_parameters(setting, model),
            "layers": capture_layer_state(optimizer, checkpointer.layout, owner=True),
            "opened": opened,
        }
    return results
