"""The training loop: one Accelerate loop for one process, DDP and DeepSpeed ZeRO-1/2/3.

``Trainer(config)`` then ``setup()`` (processes, batch plan, data, task, model, optimizer, run
directory), ``train()`` (epochs of :meth:`Trainer.train_step`, evaluation, logging, metrics.json),
``close()``. What is trained and how it is scored belongs to the task (:mod:`tvlars_scale.tasks`).

Counting: a *step* is an optimizer step over ``global_batch_size`` samples, made of
``grad_accum_steps`` micro-batches per rank. The LR schedule and TVLARS' phi_t are functions of the
step; :class:`TrainState` holds the step, the epoch and the position inside it in micro-batches, so
a checkpoint of the state plus model/optimizer/RNG resumes exactly.

Under DeepSpeed the trainer, not the JSON, decides the batch (:mod:`tvlars_scale.accelerate_setup`):
the plugin's ``train_micro_batch_size_per_gpu`` / ``gradient_accumulation_steps`` /
``train_batch_size`` are set from the plan before ``prepare`` (a JSON value that disagrees is
refused), and after ``prepare`` the engine is asked what it really uses. Accelerate's DeepSpeed optimizer wrapper's ``step()`` is a
no-op: the engine steps inside the last micro-batch's backward. ``bind_zero`` then gives the
layer-wise optimizer the layout of the flat partitions it is handed.

Checkpoints (:mod:`tvlars_scale.checkpoint`) are saved every ``checkpoint.every_steps`` steps, at
the end, and when a SIGTERM / SIGUSR1 asks the run to stop (:mod:`tvlars_scale.preemption`: save
at the next step boundary, exit 0). A step whose gradients hold NaN/Inf is skipped
(:mod:`tvlars_scale.nonfinite`); ``run.max_nonfinite_steps`` of them in a row stop the run.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedType,
    set_seed,
)
from torch import Tensor, nn
from tqdm.auto import tqdm

from tvlars_scale import fault_injection
from tvlars_scale.accelerate_setup import (
    check_engine_plan,
    deepspeed_autocast,
    make_accelerator,
    put_plan_into_deepspeed,
)
from tvlars_scale.batching import epochs_to_steps, plan_batches, scale_lr
from tvlars_scale.checkpoint import (
    CHECKPOINTS_DIR,
    Checkpointer,
    CheckpointInfo,
    complete_checkpoints,
    find_latest_complete,
    remove_leftovers,
    resolve_resume,
)
from tvlars_scale.config import Config, ConfigError
from tvlars_scale.data import DataError, ImageData, MicroBatchLoader, load_image_data
from tvlars_scale.models import ModelError
from tvlars_scale.nonfinite import (
    NonFiniteError,
    check_deepspeed_skips_nonfinite,
    gradients_are_finite,
)
from tvlars_scale.optim import build_optimizer, layerwise_param_groups, schedules
from tvlars_scale.preemption import PreemptionFlag
from tvlars_scale.tasks import MicroBatch, MicroBatches, Task, build_task
from tvlars_scale.telemetry import (
    LAYER_STATS_FILE,
    LogWindow,
    StatsByLayer,
    adapted_layer_names,
    gather_layer_stats,
    trust_ratio_summary,
)

__all__ = ["TrainState", "Trainer"]

TENSORBOARD_DIR = "tensorboard"
# run outputs
RUN_FILES = ("config.yaml", "metrics.json", TENSORBOARD_DIR, LAYER_STATS_FILE, CHECKPOINTS_DIR)


@dataclass
class TrainState:
    """Where training is; together with model, optimizer and RNG states it defines a resume point."""

    step: int = 0
    """Optimizer steps completed."""
    epoch: int = 0
    """Epoch in progress (equal to num_epochs once training is done)."""
    micro_batch: int = 0
    """Micro-batches of ``epoch`` already consumed on every rank: the data position."""
    num_samples: int = 0
    """Training samples consumed over all ranks."""
    num_skipped_steps: int = 0
    """Optimizer steps skipped for NaN/Inf gradients (not counted in ``step``)."""
    nonfinite_in_row: int = 0
    """Steps skipped in a row up to now."""

    @property
    def attempts(self) -> int:
        """Optimizer steps tried: applied and skipped."""
        return self.step + self.num_skipped_steps

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class _Accumulation:
    """One optimizer step's accumulation context for the task (tasks.Accumulation)."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        precision: AbstractContextManager,
        attempt: int,
    ):
        self.accelerator, self.model, self.precision = accelerator, model, precision
        self.attempt = attempt  # for fault_injection's NaN hook
        self.num_micro_batches = 0

    @contextmanager
    def micro_batch(self):
        self.num_micro_batches += 1
        with self.accelerator.accumulate(self.model), self.precision:
            yield

    def backward(self, loss: Tensor) -> None:
        self.accelerator.backward(fault_injection.nan_if_requested(loss, self.attempt))


class Trainer:
    """Config-driven training; see the module docstring."""

    def __init__(self, config: Config):
        self.config = config
        self.state = TrainState()
        self.run_dir = Path(config.run.output_dir)
        self.history: list[dict[str, float]] = []
        # Extra autocast for the forward passes; only DeepSpeed's half precision needs one.
        self.precision: AbstractContextManager = nullcontext()
        self.preemption = PreemptionFlag()
        self._saved_position: dict[str, int] | None = None  # TrainState of the last checkpoint

    # --- setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Everything that can fail on the user's input runs before the first file is written."""
        config = self.config
        self.accelerator = make_accelerator(config)
        accelerator = self.accelerator
        self.plan = plan_batches(
            config.batch.global_batch_size, config.batch.micro_batch_size, accelerator.num_processes
        )
        # The plan, not a launcher flag or the environment, decides the accumulation.
        accelerator.gradient_accumulation_steps = self.plan.grad_accum_steps
        self.data = _load_data(config)
        self.train_loader, self.eval_loader = self._make_loaders(self.data)
        self.steps_per_epoch = len(self.train_loader) // self.plan.grad_accum_steps
        self.total_steps = self.steps_per_epoch * config.run.num_epochs
        self.resume_from = self._check_run_dir()

        if (
            config.model.sync_batchnorm
            and accelerator.device.type == "cpu"
            and self.plan.world_size > 1
        ):
            raise ConfigError(
                "model.sync_batchnorm", "PyTorch synchronises batch norm on GPUs only, not on CPU"
            )
        set_seed(config.run.seed)  # the same initial model on every rank
        self.task: Task = build_task(config, self.data, accelerator.process_index)
        try:
            model = self.task.build_model()
        except ModelError as error:
            raise ConfigError("model.name", str(error)) from None
        self.lr = scale_lr(
            config.optim.lr,
            config.batch.lr_scaling,
            config.batch.global_batch_size,
            config.batch.base_batch_size,
        )
        self.optimizer_client = self._make_optimizer(model)
        self.adapted_layers = adapted_layer_names(self.optimizer_client)
        self.peak_lrs = [group["lr"] for group in self.optimizer_client.param_groups]

        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            put_plan_into_deepspeed(accelerator, self.plan)
        self.model, self.optimizer = accelerator.prepare(model, self.optimizer_client)
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            check_engine_plan(self.model, accelerator, self.plan)
            self.precision = deepspeed_autocast(self.model)
            if hasattr(self.optimizer_client, "bind_layout"):
                from tvlars_scale.optim.zero_layout import bind_zero

                bind_zero(self.model)
            try:
                check_deepspeed_skips_nonfinite(self.model)
            except ValueError as error:
                raise ConfigError("deepspeed", str(error)) from None
        # Dropout and other global-RNG draws differ per rank, like the samples they apply to.
        set_seed(config.run.seed, device_specific=True)
        self.checkpointer = Checkpointer(
            accelerator,
            self.model,
            self.optimizer_client,
            self.task,
            self.run_dir,
            config.checkpoint.keep_last,
        )
        if self.resume_from is not None:
            self._restore(self.resume_from)

        # collective: barrier, so that no rank checks the run directory after rank 0 wrote to it.
        accelerator.wait_for_everyone()
        self._start_run_dir()
        self.preemption.install()
        accelerator.print(self.plan.describe())
        accelerator.print(
            f"{self.steps_per_epoch} steps per epoch x {config.run.num_epochs} epochs = "
            f"{self.total_steps} optimizer steps; lr {self.lr:g} "
            f"({config.batch.lr_scaling} scaling of {config.optim.lr:g} from batch "
            f"{config.batch.base_batch_size})"
        )

    def _make_loaders(self, data: ImageData) -> tuple[MicroBatchLoader, MicroBatchLoader]:
        accelerator, plan, seed = self.accelerator, self.plan, self.config.run.seed
        step_samples = plan.global_batch_size
        if len(data.train_labels) < step_samples:
            raise ConfigError(
                "batch.global_batch_size",
                f"{step_samples} is larger than the {data.name} training set "
                f"({len(data.train_labels)} samples): not one optimizer step per epoch",
            )
        # The decoded dataset lives on the training device: micro-batches are then gathered there,
        # with no host-to-device copy per step (a no-op on the CPU).
        device = accelerator.device
        train = MicroBatchLoader(
            data.train_images.to(device),
            data.train_labels.to(device),
            plan.micro_batch_size,
            accelerator.process_index,
            plan.world_size,
            shuffle=True,
            seed=seed,
            drop_last=True,
            grad_accum_steps=plan.grad_accum_steps,
        )
        evaluation = MicroBatchLoader(
            data.test_images.to(device),
            data.test_labels.to(device),
            plan.micro_batch_size,
            accelerator.process_index,
            plan.world_size,
            shuffle=False,
            drop_last=False,
        )
        return train, evaluation

    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        optim = self.config.optim
        if optim.name == "sgd":
            groups = layerwise_param_groups(model, optim.weight_decay)
            return torch.optim.SGD(groups, lr=self.lr, momentum=optim.momentum)
        kwargs: dict = {"exclude_1d": optim.exclude_1d}
        if optim.name == "lamb":
            kwargs["betas"] = tuple(optim.betas)
        else:
            kwargs.update(momentum=optim.momentum, eta=optim.eta)
        if optim.name == "tvlars_official":
            kwargs["lmbda"] = optim.lmbda
        elif optim.name == "tvlars":
            kwargs.update(
                lmbda=optim.lmbda,
                alpha=optim.alpha,
                gamma_min=optim.gamma_min,
                delay_steps=epochs_to_steps(optim.delay_epochs, self.steps_per_epoch),
            )
        return build_optimizer(optim.name, model, self.lr, optim.weight_decay, **kwargs)

    def _check_run_dir(self) -> CheckpointInfo | None:
        """The checkpoint to resume from (None: a new run); refuses a start that would clobber a
        run or change what a resumed run means (tvlars_scale.checkpoint.policy)."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError("run.output_dir", f"{str(self.run_dir)!r} is a file")
        checkpoint = self.config.checkpoint
        return resolve_resume(
            checkpoint.resume,
            self.run_dir,
            self.config.model_dump(mode="json"),
            checkpoint.allow_changes,
            self.config.run.overwrite,
            RUN_FILES,
        )

    def _restore(self, info: CheckpointInfo) -> None:
        """Continue from checkpoint ``info``: model, optimizer, RNGs, counters, data position."""
        saved = self.checkpointer.restore(info, self.accelerator.print)
        self.state.load_state_dict(saved["state"])
        self.history = saved["history"]
        # The position was counted in the saving run's micro-batches; the loader converts it
        # through samples, so a resume on another world size continues at the same sample.
        self.train_loader.load_state_dict(saved["loader"])
        self.state.micro_batch = self.train_loader.position
        self._saved_position = self.state.state_dict()
        self.accelerator.print(
            f"resumed from {info.path} (step {self.state.step}, epoch {self.state.epoch}, "
            f"{info.world_size} -> {self.plan.world_size} ranks)"
        )

    def _start_run_dir(self) -> None:
        accelerator = self.accelerator
        if accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            resumes_own_run = (
                self.resume_from is not None
                and self.resume_from.path.parent.parent.resolve() == self.run_dir.resolve()
            )
            if not resumes_own_run:
                # A new run, or one forked from another run's checkpoint (run.overwrite, or
                # resume=auto restarting the same run): earlier outputs would mix with ours.
                for name in RUN_FILES:
                    path = self.run_dir / name
                    if path.is_dir():
                        shutil.rmtree(path)
                    elif path.exists():
                        path.unlink()
            else:
                self._trim_run_dir_to(self.state.step)
            (self.run_dir / "config.yaml").write_text(self.config.to_yaml())
        # collective: barrier, the run directory exists before trackers open files in it.
        accelerator.wait_for_everyone()
        if self.config.run.tensorboard:
            accelerator.init_trackers(TENSORBOARD_DIR, config=_flat_hparams(self.config))

    def _trim_run_dir_to(self, step: int) -> None:
        """Resuming at ``step``: drop what the interrupted run wrote past it (torn checkpoint
        directories, newer checkpoints when run.overwrite allowed a fork, per-layer records that
        the resumed run writes again)."""
        checkpoints = self.run_dir / CHECKPOINTS_DIR
        remove_leftovers(checkpoints)
        for info in complete_checkpoints(checkpoints):
            if info.step > step:
                shutil.rmtree(info.path)
        stats = self.run_dir / LAYER_STATS_FILE
        if stats.exists():
            lines = stats.read_text().splitlines(keepends=True)
            stats.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))

    # --- training ----------------------------------------------------------------------------------
    def train(self) -> dict:
        """Train to ``run.num_epochs``; returns (and writes) the final metrics. Stopped by a
        pre-emption signal, it returns ``{"preempted_at_step": step}`` after the checkpoint."""
        run = self.config.run
        accelerator = self.accelerator
        progress = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc="train",
            dynamic_ncols=True,
            disable=not (accelerator.is_main_process and run.progress_bar),
        )
        train_seconds = 0.0
        self._window = LogWindow(self.state.step)
        while self.state.epoch < run.num_epochs:
            epoch_start = time.perf_counter()
            self.model.train()
            self.train_loader.set_epoch(self.state.epoch)
            self.train_loader.start_at(self.state.micro_batch)
            batches = iter(self.train_loader)
            while self.state.micro_batch < len(self.train_loader):
                step = self.state.step
                loss = self.train_step(MicroBatches(batches, self.plan.grad_accum_steps))
                progress.update(1)
                applied = self.state.step != step  # not skipped for NaN/Inf gradients
                if applied:
                    self._window.add(loss)
                    if self.state.step % run.log_every == 0:
                        self._log_training(progress)
                if self._checkpoint_at_boundary(applied):
                    progress.close()
                    return {"preempted_at_step": self.state.step}
            self.state.epoch += 1
            self.state.micro_batch = 0
            train_seconds += time.perf_counter() - epoch_start
            if self.state.epoch % run.eval_every == 0 or self.state.epoch == run.num_epochs:
                eval_start = time.perf_counter()
                metrics = self.evaluate()
                self._window.exclude(time.perf_counter() - eval_start)
                self.history.append({"epoch": self.state.epoch, "step": self.state.step, **metrics})
                accelerator.log(metrics, step=self.state.step)
                if accelerator.is_main_process:
                    progress.write(
                        f"epoch {self.state.epoch}: "
                        + ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())
                    )
        progress.close()
        if self.config.checkpoint.save_at_end:
            self.save_checkpoint()
        return self._write_metrics(train_seconds)

    def _checkpoint_at_boundary(self, applied: bool) -> bool:
        """Between two optimizer steps: save when due (a step was applied) or when asked to stop;
        True means stop now."""
        attempts = self.state.attempts
        fault_injection.sigterm_if_requested(attempts, self.accelerator.process_index)
        # collective: all_reduce(MAX) of the stop flag inside requested() (several ranks only).
        preempted = self.preemption.requested(self.accelerator.device)
        every = self.config.checkpoint.every_steps
        if preempted or (applied and every and self.state.step % every == 0):
            self.save_checkpoint()
        fault_injection.kill_if_requested("boundary", attempts)
        if preempted:
            self.accelerator.print(
                f"stopping at step {self.state.step} ({self.preemption.describe()}); checkpoint "
                "saved, continue with checkpoint.resume=auto"
            )
        return preempted

    def save_checkpoint(self) -> None:
        """Checkpoint the current position (call on every rank); once per position."""
        position = self.state.state_dict()
        if position == self._saved_position:
            return
        trainer_state = {
            "state": position,
            "history": self.history,
            "loader": {
                **self.train_loader.state_dict(),
                "epoch": self.state.epoch,
                "position": self.state.micro_batch,
            },
        }
        metadata = {"epoch": self.state.epoch, "num_samples": self.state.num_samples}
        self.checkpointer.save(self.state.step, trainer_state, self.config.to_yaml(), metadata)
        self._saved_position = position

    def train_step(self, micro_batches: MicroBatches | list[MicroBatch]) -> Tensor:
        """One optimizer step over this rank's ``grad_accum_steps`` micro-batches.

        Returns the step's mean loss on this rank, detached and still on the device.
        """
        multiplier = self.lr_multiplier(self.state.step)
        for group, peak in zip(self.optimizer_client.param_groups, self.peak_lrs, strict=True):
            group["lr"] = peak * multiplier
        # Every step counts its own micro-batches from zero, so the accumulation boundary is its
        # last micro-batch whatever happened before (a resume mid-epoch, a previous epoch's tail).
        self.accelerator.step = 0
        accumulation = _Accumulation(
            self.accelerator, self.model, self.precision, self.state.attempts
        )
        loss = self.task.forward_backward(self.model, micro_batches, accumulation)
        if accumulation.num_micro_batches != self.plan.grad_accum_steps:
            raise RuntimeError(
                f"task {self.config.task.name} entered {accumulation.num_micro_batches} micro-batch "
                f"contexts in a step of {self.plan.grad_accum_steps}"
            )
        applied = self._optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.micro_batch += self.plan.grad_accum_steps
        self.state.num_samples += self.plan.global_batch_size
        if applied:
            self.state.step += 1
            self.state.nonfinite_in_row = 0
        else:
            self._skip_nonfinite_step()
        return loss

    def _optimizer_step(self) -> bool:
        """Step the optimizer unless a gradient is NaN/Inf; True when the step was applied."""
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # The engine stepped, or skipped a non-finite step, inside the last backward.
            return self.model.was_step_applied()
        if self.accelerator.scaler is not None:
            # fp16: the GradScaler skips non-finite steps itself and must see them to lower the scale.
            self.optimizer.step()
            return not self.optimizer.step_was_skipped
        # Gradients are all-reduced already, so every rank takes the same decision.
        # host sync: one bool per step, inside gradients_are_finite.
        if not gradients_are_finite(self.model.parameters()):
            return False
        self.optimizer.step()
        return True

    def _skip_nonfinite_step(self) -> None:
        state, limit = self.state, self.config.run.max_nonfinite_steps
        state.num_skipped_steps += 1
        state.nonfinite_in_row += 1
        self.accelerator.print(
            f"step {state.step}: NaN/Inf gradients, optimizer step skipped "
            f"({state.nonfinite_in_row} in a row, {state.num_skipped_steps} in all)"
        )
        if state.nonfinite_in_row >= limit:
            latest = find_latest_complete(self.run_dir)
            raise NonFiniteError(
                f"{state.nonfinite_in_row} optimizer steps in a row had NaN/Inf gradients at step "
                f"{state.step} (run.max_nonfinite_steps={limit}); last checkpoint: "
                f"{latest.path if latest else 'none'}"
            )

    def lr_multiplier(self, step: int) -> float:
        """The LR schedule's factor at optimizer step ``step`` (a pure function of the step)."""
        optim = self.config.optim
        if optim.schedule == "warmup_cosine":
            warmup_steps = epochs_to_steps(optim.warmup_epochs, self.steps_per_epoch)
            return schedules.warmup_cosine(step, self.total_steps, warmup_steps, optim.min_lr_ratio)
        if optim.schedule == "poly":
            return schedules.polynomial_decay(
                step, self.total_steps, optim.poly_power, optim.min_lr_ratio
            )
        return 1.0

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
        lr = values["lr"] = self.optimizer_client.param_groups[0]["lr"]
        phi = getattr(self.optimizer_client, "last_phi", None)
        if phi is not None:
            values["phi_t"] = phi
        stats = gather_layer_stats(self.optimizer_client, self.accelerator)
        if stats:
            self._append_layer_stats(stats, lr, phi)
            values.update(trust_ratio_summary(stats, self.adapted_layers))
        self.accelerator.log(values, step=self.state.step)
        progress.set_postfix(loss=f"{values['train_loss']:.4f}", lr=f"{values['lr']:.3g}")

    def _append_layer_stats(self, stats: StatsByLayer, lr: float, phi: float | None) -> None:
        """One JSON line per log step: the data of the paper's Figure 2 (per-layer norms)."""
        if not self.accelerator.is_main_process:
            return
        record = {
            "step": self.state.step,
            "lr": lr,
            "phi_t": phi,
            "layers": stats,
        }
        with open(self.run_dir / LAYER_STATS_FILE, "a") as stream:
            stream.write(json.dumps(record) + "\n")

    def _write_metrics(self, train_seconds: float) -> dict:
        plan = self.plan
        metrics = {
            "final": self.history[-1] if self.history else {},
            "history": self.history,
            "num_steps": self.state.step,
            "num_epochs": self.state.epoch,
            "num_samples": self.state.num_samples,
            "num_skipped_steps": self.state.num_skipped_steps,
            "train_seconds": train_seconds,
            "samples_per_second": self.state.num_samples / train_seconds if train_seconds else 0.0,
            "effective_batch": plan.describe(),
            "global_batch_size": plan.global_batch_size,
            "micro_batch_size": plan.micro_batch_size,
            "grad_accum_steps": plan.grad_accum_steps,
            "world_size": plan.world_size,
            "lr": self.lr,
        }
        if self.accelerator.is_main_process:
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics

    def close(self) -> None:
        """Flush trackers and leave the process group (safe to call after a failed setup)."""
        self.preemption.uninstall()
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None:
            accelerator.end_training()


def _load_data(config: Config) -> ImageData:
    data = config.data
    try:
        return load_image_data(
            data.name,
            path=data.path,
            num_synthetic=data.num_synthetic,
            image_size=data.image_size,
            seed=config.run.seed,
        )
    except DataError as error:
        raise ConfigError("data.path" if data.path else "data.name", str(error)) from None


def _flat_hparams(config: Config) -> dict[str, int | float | str | bool]:
    """The config as flat scalars (TensorBoard's hparams take no None, lists or nesting)."""
    flat = {}
    for section, values in config.model_dump(mode="json").items():
        for key, value in values.items():
            scalar = isinstance(value, (int, float, str, bool)) and value is not None
            flat[f"{section}.{key}"] = value if scalar else str(value)
    return flat
