"""The task contract: what a training run optimises and how it is evaluated.

The trainer (:mod:`tvlars_scale.trainer`) owns everything generic: processes, batch arithmetic,
data order, the optimizer and its schedule, mixed precision, logging. A task owns what differs
between classification, Barlow Twins and linear evaluation: the model, the on-device augmentation,
the loss and the evaluation metrics. Adding a task takes three steps:

1. a config section: a ``_Section`` subclass in :mod:`tvlars_scale.config` whose ``name`` field is
   ``Literal["my_task"] = "my_task"``, appended to ``TASK_CONFIGS``;
2. a subclass of :class:`Task` below in a module ``tvlars_scale/tasks/my_task.py``, constructed as
   ``MyTask(config, data, rank)`` (``rank``: this process's data-parallel rank, to give each rank
   its own augmentation stream);
3. an entry ``"my_task": MyTask`` in :data:`tvlars_scale.tasks.TASKS`, naming the class (imported
   at the top of ``tvlars_scale/tasks/__init__.py``).

The contract, per optimizer step and per evaluation:

* The trainer calls :meth:`Task.forward_backward` once per optimizer step with this rank's
  ``grad_accum_steps`` micro-batches (:class:`MicroBatches`: ``len()`` works, iterate once; each
  is drawn from the loader only when reached, so a 16K step never holds all its inputs), already
  on the training device as ``(uint8 images [n, C, H, W], int64 labels [n])`` (streamed Barlow
  Twins: :class:`~tvlars_scale.data.ssl_views.DecodedViews` in place of the images), and an
  :class:`Accumulation`. The default implementation
  calls :meth:`Task.training_loss` per micro-batch; a task whose loss couples micro-batches (Barlow
  Twins' exact accumulation) overrides it. Every forward that feeds a backward must run inside
  ``accumulation.micro_batch()`` (DDP decides there whether the backward all-reduces), and every
  backward goes through ``accumulation.backward(loss)`` (it divides by ``grad_accum_steps``, and
  under DeepSpeed the engine steps inside the last one). Exactly ``grad_accum_steps`` micro-batch
  contexts must be entered per step; the trainer checks it.
* Losses are means over the micro-batch's samples. Micro batches may differ by one sample when
  the global batch does not divide over ranks and accumulation (:mod:`tvlars_scale.batching`):
  the default :meth:`Task.forward_backward` weights each mean by its sample count
  (``accumulation.loss_weight``), so the accumulated gradient is that of the mean over the
  effective batch, and so is the data-parallel mean of the returned losses. A task whose loss is
  already computed over the global batch (Barlow Twins) sets ``loss_is_sample_mean = False``.
* Evaluation: :meth:`Task.eval_outputs` maps one micro-batch of the test split to per-sample
  tensors (first dimension = micro-batch size); the trainer gathers them from every rank with
  ``accelerator.gather_for_metrics`` and concatenates them; :meth:`Task.eval_metrics` turns that
  into floats. The last evaluation micro-batch is padded to equal size on every rank with samples
  whose label is :data:`tvlars_scale.data.loader.PAD_LABEL`: mask them out.
* The trainer puts the model in ``train()`` / ``eval()`` mode and moves nothing else: a task
  keeps its own tensors (augmentation constants) on the device of the batches it is given.
* Randomness the task draws from its own generators (augmentation) is saved and restored through
  :meth:`Task.state_dict` / :meth:`Task.load_state_dict`, so a resumed run draws what the
  uninterrupted one would have; the torch global RNG is the trainer's to save.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

from torch import Tensor, nn

if TYPE_CHECKING:
    from tvlars_scale.config import Config
    from tvlars_scale.data import ImageData

__all__ = ["Accumulation", "MicroBatch", "MicroBatches", "Task", "build_configured_model"]

MicroBatch = tuple[Tensor, Tensor]
"""``(uint8 images [n, C, H, W], int64 labels [n])`` on the training device."""


class MicroBatches:
    """One optimizer step's micro-batches, drawn one at a time from ``source`` as they are iterated.

    ``len()`` is the number of micro-batches; iterate once (a task that needs them all at once,
    such as Barlow Twins' exact accumulation, keeps what it needs while iterating).
    """

    def __init__(self, source: Iterable[MicroBatch], count: int):
        self._source: Iterator[MicroBatch] = iter(source)
        self._count = count
        self._iterated = False

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[MicroBatch]:
        if self._iterated:
            raise RuntimeError(
                "a step's micro-batches are drawn from the loader: iterate them once"
            )
        self._iterated = True
        for _ in range(self._count):
            yield next(self._source)


class Accumulation(Protocol):
    """The trainer's handle on one optimizer step's gradient accumulation."""

    def micro_batch(self) -> AbstractContextManager[None]:
        """Context for one micro-batch's forward and backward."""
        ...

    def backward(self, loss: Tensor) -> None:
        """Back-propagate one micro-batch's mean loss (scaled by ``1 / grad_accum_steps``)."""
        ...

    def loss_weight(self, num_samples: int) -> float:
        """Factor of the mean loss of a micro batch of ``num_samples`` samples that counts each
        sample once in the step's global mean (1 when every micro batch is full)."""
        ...


class Task(ABC):
    """Model, loss and metrics of one kind of run (see the module docstring for the contract)."""

    loss_is_sample_mean: bool = True
    """:meth:`training_loss` is a mean over the micro batch's samples (weighted by their count)."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model to train, on the CPU, freshly initialised (the seed is already set)."""

    @abstractmethod
    def training_loss(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        """Mean loss of one micro-batch of raw uint8 images (augment them here)."""

    @abstractmethod
    def eval_outputs(self, model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Per-sample evaluation tensors of one test micro-batch (called under ``no_grad``)."""

    @abstractmethod
    def eval_metrics(self, outputs: dict[str, Tensor]) -> dict[str, float]:
        """Metrics from the gathered outputs of the whole test split (padding still included)."""

    def state_dict(self) -> dict:
        """The task's own random state (e.g. augmentation generators); empty when it has none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state to load, got {sorted(state)}")

    def forward_backward(
        self, model: nn.Module, micro_batches: MicroBatches, accumulation: Accumulation
    ) -> Tensor:
        """Forward and backward over one optimizer step's micro-batches; returns the mean loss
        (detached, on the device: the trainer syncs it to the host only when it logs)."""
        losses = []
        for images, labels in micro_batches:
            with accumulation.micro_batch():
                loss = self.training_loss(model, images, labels)
                weight = accumulation.loss_weight(len(labels)) if self.loss_is_sample_mean else 1.0
                if weight != 1.0:  # an uneven plan's micro batch; even plans scale nothing
                    loss = loss * weight
                accumulation.backward(loss)
            losses.append(loss.detach())
        return sum(losses) / len(losses)


def build_configured_model(config: Config, data: ImageData) -> nn.Module:
    """``config.model`` shaped for ``data`` (classes, channels, image size): every task's network."""
    from tvlars_scale.models import build_model

    model = config.model
    return build_model(
        model.name,
        data.num_classes,
        in_chans=data.in_chans,
        image_size=data.image_size,
        cifar_stem=model.cifar_stem,
        sync_batchnorm=model.sync_batchnorm,
        init=model.init,
    )
