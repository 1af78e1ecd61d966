"""Tasks: what a training run optimises and how it is evaluated.

The contract between the trainer and a task, and the steps to add one, are in
:mod:`tvlars_scale.tasks.base`; this module names the tasks and builds the configured one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tvlars_scale.tasks.barlow_twins import BarlowTwinsTask
from tvlars_scale.tasks.base import (
    Accumulation,
    MicroBatch,
    MicroBatches,
    Task,
    build_configured_model,
)
from tvlars_scale.tasks.classification import ClassificationTask

if TYPE_CHECKING:
    from tvlars_scale.config import Config
    from tvlars_scale.data import ImageData

__all__ = [
    "TASKS",
    "Accumulation",
    "MicroBatch",
    "MicroBatches",
    "Task",
    "build_configured_model",
    "build_task",
]

TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "barlow_twins": BarlowTwinsTask,
}
"""Task name (``config.task.name``) -> the task class."""


def build_task(config: Config, data: ImageData, rank: int) -> Task:
    """The task named by ``config.task.name``, built for ``data`` on data-parallel ``rank``."""
    return TASKS[config.task.name](config, data, rank)
