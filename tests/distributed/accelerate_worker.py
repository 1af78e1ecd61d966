"""Launched by test_accelerate_zero.py as ``accelerate launch --config_file
launch/accelerate_zero{1,2,3}.yaml accelerate_worker.py OUTPUT OPTIMIZER``: trains the tiny CNN through
Accelerate's DeepSpeed integration, the way the trainer does, and saves the gathered parameters."""

import sys

import tiny_training
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch.utils.data import DataLoader, TensorDataset

from tvlars_scale.optim.zero_layout import bind_zero


def main(output_path: str, optimizer_name: str) -> None:
    torch.set_num_threads(1)  # two ranks share the machine's cores
    accelerator = Accelerator(
        gradient_accumulation_steps=tiny_training.GRAD_ACCUM_STEPS,
        # Without gloo, Accelerate on a CPU machine reports one process on every rank.
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
    )
    assert accelerator.num_processes == tiny_training.WORLD_SIZE
    model, optimizer = tiny_training.make_model_and_optimizer(optimizer_name)
    images, labels = tiny_training.make_data()
    # Samples in (step, micro-step, rank) order: Accelerate deals batch i to rank i % world_size.
    dataset = TensorDataset(images.flatten(0, 3), labels.flatten(0, 3))
    loader = DataLoader(dataset, batch_size=tiny_training.MICRO_BATCH_SIZE, shuffle=False)
    engine, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    bind_zero(optimizer)  # Accelerate's DeepSpeedOptimizerWrapper
    for batch_images, batch_labels in loader:
        with accelerator.accumulate(engine):
            loss = F.cross_entropy(engine(batch_images), batch_labels)
            accelerator.backward(loss)  # the engine steps the optimizer at the boundary
            optimizer.step()  # a no-op under DeepSpeed
            optimizer.zero_grad()
    params = tiny_training.gather_parameters(engine.module)
    if accelerator.is_main_process:
        torch.save(params, output_path)
    # Nobody leaves the process group (end_training destroys it) while a peer may still use it.
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
