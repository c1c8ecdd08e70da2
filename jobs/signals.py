"""Stopping a unit when SLURM asks for it, whichever way the unit was launched.

SLURM sends the stop signal (USR2; `--signal=USR2@<s>`) before a time limit and at preemption.
While a unit runs, `StopOnSignal` catches it: a stage that may stop anywhere has `Stopped`
raised at once (its work on disk is consistent at every line); training gets a flag that it
checks after each optimizer step, where it saves and returns. A second signal while stopping is
ignored, and so is every later one, until the process ends: SLURM may send both a preemption
and a time-limit signal, and the first stop is the one that requeues. Once the unit has recorded
its stop, `hand_over` calls the handler installed before (submitit's: checkpoint, `scontrol
requeue`, exit); the plain sbatch path requeues from its script instead. The sbatch path also
stops on SIGTERM (a cancellation, or a preemption SLURM requeues itself).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import submitit

from distill.stage import Stopped

# submitit's choice: USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise.
STOP_SIGNAL = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]


class StopOnSignal:
    """While active, the stop signals ask the running unit to stop (see the module's docstring).
    Outside the main thread, where no handler can be set, it never reports a stop."""

    def __init__(self, anywhere: bool, signums: tuple[int, ...] = (STOP_SIGNAL,)) -> None:
        self.anywhere, self.signums = anywhere, signums
        self.received: int | None = None
        self.previous: dict[int, Any] = {}
        self.active = False
        # Where a unit runs in other processes (`jobs.launch`): passes the signal on to them.
        self.forward: Callable[[int], None] | None = None

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.signums}
            self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active and self.received is None:
            for s, previous in self.previous.items():
                signal.signal(s, previous)
        self.active = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Ignored at the C level from here on: a Python handler would be reset to the default
        # (terminate) while the interpreter shuts down, and a late second signal would kill the
        # process after the stop was recorded but before the requeue.
        for s in self.signums:
            signal.signal(s, signal.SIG_IGN)
        self.received = signum
        if self.forward is not None:
            self.forward(signum)
        when = "now" if self.anywhere else "at the next safe point"
        print(f"caught {signal.Signals(signum).name}: stopping {when}; further stop signals are ignored",
              file=sys.stderr, flush=True)
        if self.anywhere:
            raise Stopped(signal.Signals(signum).name)

    def requested(self) -> bool:
        return self.received is not None

    def hand_over(self) -> None:
        """Call the handler that was installed before (submitit's: checkpoint, requeue, exit),
        with further signals still ignored. Returns only when there was none, e.g. outside a
        submitit job."""
        previous = self.previous.get(self.received) if self.received is not None else None
        if callable(previous):
            previous(self.received, None)
