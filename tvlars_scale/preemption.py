"""Pre-emption: SIGTERM / SIGUSR1 ask the run to checkpoint at the next optimizer step and exit 0.

Schedulers send one of these before they kill a job (SLURM: ``--signal=USR1@120``; Kubernetes and
most clouds: SIGTERM, then SIGKILL after a grace period). The handler only sets a flag: saving
inside a signal handler would interrupt a collective halfway. At every optimizer-step boundary the
ranks agree on the flag with one tiny all-reduce, so they all save the same step even when the
signal reached them at different steps, or reached only one of them.

A launcher that requeues pre-empted jobs (``launch/slurm.sbatch``) names a file in
``TVLARS_STOP_MARKER``: rank 0 creates it when the ranks agree to stop, so that a run that stopped
for a signal (saved, exit 0, to be continued) is told apart from one that finished (exit 0, done).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["PREEMPTION_SIGNALS", "STOP_MARKER_ENV", "PreemptionFlag"]

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_MARKER_ENV = "TVLARS_STOP_MARKER"


class PreemptionFlag:
    """Catches the pre-emption signals while installed; :meth:`requested` says whether any rank got one."""

    def __init__(self) -> None:
        self.received: int | None = None  # the signal number, once one arrived
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        # Python runs handlers on the main thread only; elsewhere (a notebook's worker thread)
        # the default behaviour stays, and the run is simply not pre-emption safe.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in PREEMPTION_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def describe(self) -> str:
        """What asked this rank to stop, for the log line."""
        return signal.Signals(self.received).name if self.received else "another rank's signal"

    def requested(self, device: torch.device) -> bool:
        """Whether any rank received a pre-emption signal (call it on every rank at the same point).
        When they did, rank 0 creates the ``TVLARS_STOP_MARKER`` file, if one is named."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            stop, first = self.received is not None, True
        else:
            flag = torch.tensor([int(self.received is not None)], device=device)
            # collective: all_reduce(MAX) of one int per optimizer step: every rank saves the same step.
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop, first = bool(flag.item()), dist.get_rank() == 0  # host sync: one int per step
        marker = os.environ.get(STOP_MARKER_ENV)
        if stop and first and marker:
            Path(marker).write_text(f"{self.describe()}\n")
        return stop
