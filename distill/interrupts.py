"""Ctrl-C in a terminal sends SIGINT to every process of the foreground job at once: the driver,
the jobs it runs locally, their worker processes; the local executor forwards one more, and
people press twice. The first one stops a process, which then handles it itself (a record in the
manifest, one line) and ignores every later one until it ends (`ignore_sigint`): a second
KeyboardInterrupt would cut the record short, or end the exit in a traceback. Helper processes
started under `sigint_ignored` never react to it at all.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from distill.errors import DistillError, not_permitted


def ignore_sigint() -> None:
    """This process is stopping on Ctrl-C: SIGINT is ignored from now until it ends."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT is ignored for the duration, by this process and by every process it starts
    meanwhile (an ignored signal stays ignored across fork and exec, also while a new Python
    interpreter imports its modules). Only the main thread receives signals: elsewhere this
    does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """A SIGINT that comes during the block raises KeyboardInterrupt when the block ends, not
    inside it: for steps that must not be cut in the middle, such as starting worker processes
    (one orphaned half-way fails on its own and prints a traceback). Main thread only, and only
    where Ctrl-C raises KeyboardInterrupt (not in a process already stopping)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def stopped(line: str) -> int:
    """Print the one line of a command stopped by Ctrl-C; returns its exit status, 130. Called
    after the `except KeyboardInterrupt` block, when the exception and the frames it held are
    gone: their progress bars close (and redraw) then, and the line has to come last."""
    ignore_sigint()
    print(line, file=sys.stderr, flush=True)
    return 128 + signal.SIGINT


def run_command(body: Callable[[], int | None], stopped_line: Callable[[], str], *, speak: bool = True) -> int:
    """A command's exit status, the same for every entry point (`python -m distill`, the
    driver, `jobs.sbatch`): what `body` returns (None: 0); 2 and one `error:` line for a
    `DistillError` or a refused permission (`speak` False: no line, for the tasks of a job that
    are not the one that speaks for it); on Ctrl-C, 130 and `stopped_line()`."""
    try:
        return body() or 0
    except DistillError as exc:
        if speak:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"error: {not_permitted(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return stopped(stopped_line())
