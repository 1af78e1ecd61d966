"""Faults on demand, for the resume and robustness tests; inert unless the variables below are set.

Tests must kill a run at a chosen point (inside a checkpoint save, between two optimizer steps),
pre-empt it, or feed it NaN gradients, with real processes and real signals, so the hooks live in
the code paths they test. Each is a no-op costing one dictionary lookup when its variable is unset.

Steps are counted in *attempts* (optimizer steps tried, skipped non-finite ones included), so a
run that skips steps can still be stopped at a chosen point; without skips attempts = steps.

``TVLARS_FAULT_KILL=<point>:<n>``
    SIGKILL this process (every rank reaching the point) at ``point``:
    ``boundary`` = once ``n`` attempts are done and any checkpoint of that step was published;
    ``in_save`` = inside the save of optimizer step ``n``, after every rank's files are written and
    before the directory is published.
``TVLARS_FAULT_SIGTERM=<n>``
    Rank 0 sends itself SIGTERM once ``n`` attempts are done (the other ranks get no signal: the
    pre-emption flag must still reach them).
``TVLARS_FAULT_NAN_STEPS=<i>,<j>,...``
    Multiply the loss by NaN in attempts ``i``, ``j``, ... (counted from 0), so that every gradient
    of that step is NaN.
"""

from __future__ import annotations

import os
import signal

import torch

__all__ = ["kill_if_requested", "nan_if_requested", "sigterm_if_requested"]

KILL = "TVLARS_FAULT_KILL"
SIGTERM = "TVLARS_FAULT_SIGTERM"
NAN_STEPS = "TVLARS_FAULT_NAN_STEPS"


def kill_if_requested(point: str, count: int) -> None:
    """SIGKILL this process if ``TVLARS_FAULT_KILL`` names ``point`` at ``count``."""
    if os.environ.get(KILL) == f"{point}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)


def sigterm_if_requested(attempts: int, rank: int) -> None:
    """Rank 0 sends itself SIGTERM if ``TVLARS_FAULT_SIGTERM`` names ``attempts``."""
    if rank == 0 and os.environ.get(SIGTERM) == str(attempts):
        os.kill(os.getpid(), signal.SIGTERM)


def nan_if_requested(loss: torch.Tensor, attempt: int) -> torch.Tensor:
    """``loss * NaN`` if ``TVLARS_FAULT_NAN_STEPS`` lists step attempt ``attempt``, else ``loss``."""
    steps = os.environ.get(NAN_STEPS)
    if steps and str(attempt) in steps.split(","):
        return loss * float("nan")
    return loss
