"""Stopping cleanly on SIGTERM / SIGINT: SLURM preemption, time limits and Ctrl-C.

SLURM sends SIGTERM at preemption and at the time limit (``--signal=TERM@SECONDS`` sends it
that long before), and torchrun's agent forwards it to its workers. A signal only sets a
flag; the training loop asks :meth:`StopRequest.agreed` once per step. Under torchrun the
ranks agree on the step to stop at through a MAX all-reduce of the flag, read one step
later (when the step before has finished anyway, so it adds no wait on a GPU): every rank
then finishes the same step, the run writes a step checkpoint collectively and the process
exits non-zero (:class:`~distdrgn.errors.Stopped`), so a scheduler with ``--requeue`` runs it again and the
rerun resumes where it stopped. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from distdrgn.errors import Stopped

__all__ = ["StopRequest", "Stopped"]


class StopRequest:
    """Installs SIGTERM/SIGINT handlers for its lifetime (a context manager) and says when all
    ranks have seen a stop request."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, device: torch.device, distributed: bool):
        self.signum: int | None = None  # the first signal received on this rank
        self.distributed = distributed
        self._flag = torch.zeros((), dtype=torch.float32, device=device)  # this rank's request, then the MAX
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the handlers alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = self.signum or signum
        if signum == signal.SIGINT:  # the next Ctrl-C takes the default path
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def agreed(self) -> bool:
        """Call once per step, after queuing it: True when a rank asked to stop by the step before.

        All ranks return the same value at the same step: the value read is the all-reduced
        flag of the previous call, and this rank's own request joins the reduction queued now.
        """
        if not self.distributed:
            return self.signum is not None
        stop = bool(self._flag)  # the previous step's MAX: equal on every rank
        if self.signum is not None:
            self._flag.fill_(1.0)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        return stop

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal on another rank"
