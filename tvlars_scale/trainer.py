"""The training loop: one Accelerate loop for one process, DDP and DeepSpeed ZeRO-1/2/3.

``Trainer(config)``, then ``setup()`` (the build phase: every config section becomes its component
once, :mod:`tvlars_scale.build`), ``train()`` (epochs of :meth:`Trainer.train_step`, evaluation,
logging, metrics.json), ``close()``. After ``setup()`` the loop reads no config. What is trained
and how it is scored belongs to the task (:mod:`tvlars_scale.tasks`); the run directory's files to
:class:`~tvlars_scale.run_dir.RunDir`; when and what to checkpoint to
:class:`~tvlars_scale.checkpoint.Checkpointer`.

Counting: a *step* is an optimizer step over ``global_batch_size`` samples, made of
``grad_accum_steps`` micro-batches per rank. The LR schedule and TVLARS' phi_t are functions of the
step; :class:`TrainState` holds the step, the epoch and the position inside it in micro-batches, so
a checkpoint of the state plus model/optimizer/RNG resumes exactly.

A SIGTERM / SIGUSR1 (:mod:`tvlars_scale.preemption`) saves a checkpoint at the next step boundary
and stops the run (exit 0). A step whose gradients hold NaN/Inf is skipped
(:mod:`tvlars_scale.nonfinite`); ``run.max_nonfinite_steps`` of them in a row stop the run.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from accelerate.utils import broadcast_object_list, set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from tvlars_scale import accelerate_setup, build, fault_injection
from tvlars_scale.accelerate_setup import StepAccumulation, make_accelerator, prepare
from tvlars_scale.checkpoint import Checkpointer, find_latest_complete
from tvlars_scale.config import Config, ConfigError
from tvlars_scale.nonfinite import NonFiniteError
from tvlars_scale.preemption import PreemptionFlag
from tvlars_scale.run_dir import RunDir
from tvlars_scale.tasks import MicroBatch, MicroBatches, build_task
from tvlars_scale.telemetry import (
    LogWindow,
    adapted_layer_names,
    main_process_layer_stats,
    run_metrics,
    trust_ratio_summary,
)
from tvlars_scale.train_state import TrainState
from tvlars_scale.training.ema import WeightEMA
from tvlars_scale.training.optimizer_step import OptimizerStep
from tvlars_scale.training.reporting import RunReport

__all__ = ["TrainState", "Trainer"]


class Trainer:
    """Config-driven training; see the module docstring."""

    def __init__(self, config: Config):
        self.config = config
        self.state = TrainState()
        self.history: list[dict[str, float]] = []
        self.preemption = PreemptionFlag()

    def build(self, *, dry_run: bool = False) -> nn.Module:
        """The build phase, in order: every config section becomes its component. Everything that
        can fail on the user's input runs here, before the first file is written; the RNG is seeded
        where the model is built, as the seed defines it. ``dry_run``: the model on the meta device
        (no weights allocated), the run directory neither locked nor written."""
        config, run = self.config, self.config.run
        self.accelerator = accelerator = make_accelerator(config)
        self.plan = build.batch_plan(config, accelerator.num_processes)
        # The plan, not a launcher flag or the environment, decides the accumulation.
        accelerator.gradient_accumulation_steps = self.plan.grad_accum_steps
        self.data = build.image_data(config, accelerator)
        self.train_loader, self.eval_loader = build.loaders(
            self.data, self.plan, accelerator, run.seed, config.data, config.task.name
        )
        self.steps_per_epoch = len(self.train_loader) // self.plan.grad_accum_steps
        self.total_steps = self.steps_per_epoch * run.num_epochs
        self.run_dir = RunDir(config, is_main=accelerator.is_main_process)
        if not dry_run:
            held_by = self.run_dir.lock() if accelerator.is_main_process else None
            # collective: broadcast of the main process's lock outcome: every rank stops together.
            [held_by] = broadcast_object_list([held_by])
            if held_by:
                raise ConfigError("run.output_dir", held_by)
        # collective: broadcast of the main process's choice (the other ranks look at nothing).
        self.resume_from = self.run_dir.resolve_start(broadcast_object_list)

        set_seed(run.seed)  # the same initial model on every rank
        self.task = build_task(config, self.data, accelerator.process_index)
        with torch.device("meta") if dry_run else nullcontext():
            model = build.model(
                config, self.task, accelerator, resuming=self.resume_from is not None
            )
        self.lr = build.peak_lr(config, self.plan)
        self.optimizer = build.optimizer(config.optim, model, self.lr, self.steps_per_epoch)
        self.lr_at = build.lr_schedule(
            config.schedule, self.lr, self.steps_per_epoch, self.total_steps
        )
        self.adapted_layers = adapted_layer_names(self.optimizer)
        return model

    def dry_run(self) -> None:
        """Build everything but the weights, print the plan and the resolved config; write nothing."""
        model = self.build(dry_run=True)
        start = f"resume from {self.resume_from.path}" if self.resume_from else "a new run"
        num_params = sum(p.numel() for p in model.parameters())
        self.accelerator.print(
            f"dry run: {self.plan.describe()}\n{self._schedule_line()}\n"
            f"model {self.config.model.name}: {num_params:,} parameters; optimizer "
            f"{type(self.optimizer).__name__} ({self.config.optim.name}); data {self.data.name}: "
            f"{len(self.data.train_labels)} train / {len(self.data.test_labels)} test images, "
            f"{self.data.num_classes} classes; "
            f"{start} in {self.run_dir.path}\n--- resolved config ---\n{self.config.to_yaml()}",
            end="",
        )

    def setup(self) -> None:
        """:meth:`build`, then Accelerate / DeepSpeed, the checkpointer, the resume, the run directory."""
        model = self.build()
        config, run, accelerator = self.config, self.config.run, self.accelerator
        resume_from = self.resume_from
        # self.optimizer stays the client optimizer (its param groups, telemetry); the prepared
        # wrapper only zeroes gradients and, without DeepSpeed, steps it.
        # FLOPs, MFU, memory, data wait, profile; the FLOPs are counted on the eager model.
        self.report = RunReport(model, self.data, self.plan, accelerator, config, self.run_dir.path)
        self.model, self.prepared_optimizer, self.precision = prepare(
            accelerator, model, self.optimizer, self.plan, config
        )
        # Dropout and other global-RNG draws differ per rank, like the samples they apply to.
        set_seed(run.seed, device_specific=True)
        self.checkpointer = Checkpointer(
            accelerator,
            self.model,
            self.optimizer,
            self.task,
            self.run_dir.path,
            every_steps=config.checkpoint.every_steps,
            keep_last=config.checkpoint.keep_last,
            config_yaml=config.to_yaml(),
            train_state=self,
        )
        layout, ema = self.checkpointer.layout, run.ema
        self.ema = self.checkpointer.ema = (
            None if ema is None else WeightEMA(layout, self.checkpointer.module, **dict(ema))
        )
        self.optimizer_step = OptimizerStep(
            accelerator, self.model, self.prepared_optimizer, layout, config.optim.grad_clip
        )
        if resume_from is not None:  # resume: auto goes past a corrupt checkpoint to the previous
            resume_from = self.run_dir.restore(self.checkpointer, resume_from, accelerator.print)
            accelerator.print(
                f"resumed from {resume_from.path} (step {self.state.step}, epoch "
                f"{self.state.epoch}, {resume_from.world_size} -> {self.plan.world_size} ranks)"
            )
        # collective: barrier, so that no rank checks the run directory after rank 0 wrote to it.
        accelerator.wait_for_everyone()
        self.run_dir.start(resume_from, self.state.step)
        # collective: barrier, the run directory exists before trackers open files in it.
        accelerator.wait_for_everyone()
        accelerate_setup.start_trackers(accelerator, self.run_dir.hparams())
        self.preemption.install()
        accelerator.print(self.plan.describe())
        accelerator.print(self._schedule_line())

    def _schedule_line(self) -> str:
        batch = self.config.batch
        return (
            f"{self.steps_per_epoch} steps per epoch x {self.config.run.num_epochs} epochs = "
            f"{self.total_steps} optimizer steps; lr {self.lr:g} ({batch.lr_scaling} scaling of "
            f"{self.config.optim.lr:g} from batch {batch.base_batch_size})"
        )

    def state_dict(self) -> dict:
        """The loop's part of a checkpoint (the Checkpointer asks for it when it saves)."""
        loader = {
            **self.train_loader.state_dict(),
            "epoch": self.state.epoch,
            "position": self.state.micro_batch,
        }
        return {"state": self.state.state_dict(), "history": self.history, "loader": loader}

    def load_state_dict(self, saved: dict) -> None:
        self.state.load_state_dict(saved["state"])
        self.history = saved["history"]
        # The position was counted in the saving run's micro-batches; the loader converts it
        # through samples, so a resume on another world size continues at the same sample.
        self.train_loader.load_state_dict(saved["loader"])
        self.state.micro_batch = self.train_loader.position

    def train(self) -> dict:
        """Train to ``run.num_epochs``; returns (and writes) the final metrics. Stopped by a
        pre-emption signal, it returns ``{"preempted_at_step": step}`` after the checkpoint."""
        run, accelerator, state = self.config.run, self.accelerator, self.state
        progress = tqdm(
            total=self.total_steps,
            initial=state.step,
            desc="train",
            dynamic_ncols=True,
            disable=not (accelerator.is_main_process and run.progress_bar),
        )
        train_seconds = 0.0
        self._window = LogWindow(state.step)
        while state.epoch < run.num_epochs:
            epoch_start = time.perf_counter()
            self.model.train()
            self.train_loader.set_epoch(state.epoch)
            self.train_loader.start_at(state.micro_batch)
            batches = self.report.timed(iter(self.train_loader), state.step)
            while state.micro_batch < len(self.train_loader):
                step = state.step
                loss = self.train_step(MicroBatches(batches, self.plan.grad_accum_steps))
                progress.update(1)
                self.report.after_step(state.step)
                applied = state.step != step  # not skipped for NaN/Inf gradients
                if applied:
                    self._window.add(loss)
                    if state.step % run.log_every == 0:
                        self._log_training(progress)
                if self._step_finished(applied):
                    progress.close()
                    return {"preempted_at_step": state.step}
            state.epoch += 1
            state.micro_batch = 0
            train_seconds += time.perf_counter() - epoch_start
            if state.epoch % run.eval_every == 0 or state.epoch == run.num_epochs:
                eval_start = time.perf_counter()
                metrics = self.evaluate()
                if self.ema is not None:  # collective under ZeRO: the average's layers made whole
                    metrics.update(self.ema.evaluated(self.evaluate))
                self._window.exclude(time.perf_counter() - eval_start)
                self.history.append({"epoch": state.epoch, "step": state.step, **metrics})
                accelerator.log(metrics, step=state.step)
                if accelerator.is_main_process:
                    progress.write(
                        f"epoch {state.epoch}: "
                        + ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())
                    )
        progress.close()
        if self.config.checkpoint.save_at_end:
            self.checkpointer.save(state.step)
            self.run_dir.export_model(self.data.mean, self.data.std)
        return self._write_metrics(train_seconds)

    def _step_finished(self, applied: bool) -> bool:
        """Between two optimizer steps: checkpoint when due (a step was applied) or when asked to
        stop; True means stop now."""
        attempts = self.state.attempts
        fault_injection.sigterm_if_requested(attempts, self.accelerator.process_index)
        # collective: all_reduce(MAX) of the stop flag inside requested() (several ranks only).
        preempted = self.preemption.requested(self.accelerator.device)
        if preempted or (applied and self.checkpointer.should_save(self.state.step)):
            self.checkpointer.save(self.state.step)
        fault_injection.kill_if_requested("boundary", attempts)
        if preempted:
            self.accelerator.print(
                f"stopping at step {self.state.step} ({self.preemption.describe()}); checkpoint "
                "saved, continue with checkpoint.resume=auto"
            )
        return preempted

    def train_step(self, micro_batches: MicroBatches | list[MicroBatch]) -> Tensor:
        """One optimizer step over this rank's ``grad_accum_steps`` micro-batches.

        Returns the step's mean loss on this rank, detached and still on the device.
        """
        lr = self.lr_at(self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Every step counts its own micro-batches from zero, so the accumulation boundary is its
        # last micro-batch whatever happened before (a resume mid-epoch, a previous epoch's tail).
        self.accelerator.step = 0
        accumulation = StepAccumulation(
            self.accelerator, self.model, self.precision, self.state.attempts, self.plan
        )
        loss = self.task.forward_backward(self.model, micro_batches, accumulation)
        if accumulation.num_micro_batches != self.plan.grad_accum_steps:
            raise RuntimeError(
                f"task {type(self.task).__name__} entered {accumulation.num_micro_batches} "
                f"micro-batch contexts in a step of {self.plan.grad_accum_steps}"
            )
        applied = self.optimizer_step.step()
        self.prepared_optimizer.zero_grad(set_to_none=True)
        self.state.micro_batch += self.plan.grad_accum_steps
        self.state.num_samples += self.plan.global_batch_size
        if applied:
            self.state.step += 1
            self.state.nonfinite_in_row = 0
            if self.ema is not None:
                self.ema.update(self.state.step)
        else:
            self._skip_nonfinite_step()
        return loss

    def _skip_nonfinite_step(self) -> None:
        state, limit = self.state, self.config.run.max_nonfinite_steps
        state.num_skipped_steps += 1
        state.nonfinite_in_row += 1
        self.accelerator.print(
            f"step {state.step}: NaN/Inf gradients, optimizer step skipped "
            f"({state.nonfinite_in_row} in a row, {state.num_skipped_steps} in all)"
        )
        if state.nonfinite_in_row >= limit:
            latest = find_latest_complete(self.run_dir.path)
            raise NonFiniteError(
                f"{state.nonfinite_in_row} optimizer steps in a row had NaN/Inf gradients at step "
                f"{state.step} (run.max_nonfinite_steps={limit}); last checkpoint: "
                f"{latest.path if latest else 'none'}"
            )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Task metrics over the whole test split (every rank evaluates its shard)."""
        self.model.eval()
        self.eval_loader.start_at(0)
        local: dict[str, list[Tensor]] = {}
        with self.precision:
            for images, labels in self.eval_loader:
                for key, value in self.task.eval_outputs(self.model, images, labels).items():
                    local.setdefault(key, []).append(value)
        # Every rank holds the same number of (padded) samples, so one gather per key suffices.
        outputs = {key: torch.cat(values) for key, values in local.items()}
        # collective: all_gather of each per-sample output tensor.
        gathered = self.accelerator.gather_for_metrics(outputs)
        self.model.train()
        return self.task.eval_metrics(gathered)

    def _log_training(self, progress: tqdm) -> None:
        values = self._window.flush(self.state.step, self.plan.global_batch_size)
        lr = values["lr"] = self.optimizer.param_groups[0]["lr"]
        phi = getattr(self.optimizer, "last_phi", None)
        if phi is not None:
            values["phi_t"] = phi
        if self.optimizer_step.grad_norm is not None:  # host sync: at a log step only
            values["grad_norm"] = float(self.optimizer_step.grad_norm)
        stats = main_process_layer_stats(self.optimizer, self.accelerator)
        if stats:
            record = {"step": self.state.step, "lr": lr, "phi_t": phi, "layers": stats}
            self.run_dir.append_layer_stats(record)
            values.update(trust_ratio_summary(stats, self.adapted_layers))
        values.update(self.report.window(values["samples_per_second"]))
        self.accelerator.log(values, step=self.state.step)
        progress.set_postfix(loss=f"{values['train_loss']:.4f}", lr=f"{values['lr']:.3g}")

    def _write_metrics(self, train_seconds: float) -> dict:
        metrics = run_metrics(self.history, self.state, self.plan, self.lr, train_seconds)
        metrics.update(self.report.summary())
        self.run_dir.write_metrics(metrics)
        return metrics

    def close(self) -> None:
        """Flush trackers and leave the process group (safe to call after a failed setup)."""
        self.preemption.uninstall()
        for loader in (getattr(self, "train_loader", None), getattr(self, "eval_loader", None)):
            getattr(loader, "close", lambda: None)()  # streaming: workers that ignore SIGTERM
        if hasattr(self, "run_dir"):
            self.run_dir.unlock()
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None:
            accelerator.end_training()
