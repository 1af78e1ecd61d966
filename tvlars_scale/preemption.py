"""Pre-emption: SIGTERM / SIGUSR1 ask the run to checkpoint at the next optimizer step and exit 0.

Schedulers send one of these before they kill a job (SLURM: ``--signal=USR1@120``; Kubernetes and
most clouds: SIGTERM, then SIGKILL after a grace period). The handler only sets a flag: saving
inside a signal handler would interrupt a collective halfway. At every optimizer-step boundary the
ranks agree on the flag with one tiny all-reduce, so they all save the same step even when the
signal reached them at different steps, or reached only one of them.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

__all__ = ["PREEMPTION_SIGNALS", "PreemptionFlag"]

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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
        """Whether any rank received a pre-emption signal (call it on every rank at the same point)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received is not None
        flag = torch.tensor([int(self.received is not None)], device=device)
        # collective: all_reduce(MAX) of one int per optimizer step: every rank saves the same step.
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())  # host sync: one int per optimizer step
