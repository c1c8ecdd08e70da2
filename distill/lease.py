"""One driver per run: a lease held while a driver works on a run.

Two drivers of one run would both see a stage missing and both submit it (with the local
executor nothing else tells them apart), so the driver takes `driver.lease` first: a small file
naming its host, pid and start time, with a heartbeat it renews every `HEARTBEAT_S` seconds from
a thread. A second driver refuses with one line naming the holder. A lease whose holder is gone
is taken over: on the same host, when its pid no longer runs; from another host (two login
nodes), when its heartbeat is older than `STALE_S`.

Units have a lighter guard of the same kind: a unit records its host and pid while it runs and
renews a heartbeat file (`UnitBeat`), and `live_holder` says whether that process still runs
(on another host: whether its heartbeat is fresh), so the same unit is never started twice,
whichever launcher or host starts it (`distill.runner`). A driver re-checks its lease before
each submission and each record it makes after waiting (`RunLease.check`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from filelock import BaseFileLock, FileLock, SoftFileLock, Timeout

from distill.errors import DistillError
from distill.jsonl import atomic_write_text

HEARTBEAT_S = 30.0
STALE_S = 120.0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (ended, not yet reaped by its parent) is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def last_beat(record: dict[str, Any], beat: Path | None = None) -> float:
    """When the process a record names last said it was alive: the record's heartbeat, or the
    newer time in its heartbeat file (`beat`, which a running unit renews)."""
    last = float(record.get("heartbeat", 0))
    if beat is not None:
        with suppress(OSError, ValueError):
            last = max(last, float(beat.read_text()))
    return last


def live_holder(record: dict[str, Any], stale_s: float = STALE_S, beat: Path | None = None) -> str | None:
    """"pid P on host H" when the process a record names still runs (or, on another host,
    renewed its heartbeat within `stale_s`), else None."""
    host, pid = record.get("host"), record.get("pid")
    if host is None or pid is None or (host, pid) == (me()["host"], me()["pid"]):
        return None
    here = host == socket.gethostname()  # a pid is checked where it runs, elsewhere the heartbeat
    alive = pid_alive(int(pid)) if here else time.time() - last_beat(record, beat) < stale_s
    return f"pid {pid} on {host}" if alive else None


def skew_hint(record: dict[str, Any]) -> str:
    """A phrase for a heartbeat that lies in the future: the holder's clock is ahead of this
    host's, so the lease looks fresh for that much longer."""
    ahead = float(record.get("heartbeat", 0)) - time.time()
    if ahead <= 5:
        return ""
    return (f"; its heartbeat is {ahead:.0f} s in the future: the clocks of {record.get('host')} and "
            f"{socket.gethostname()} differ (check NTP), so it looks held until then")


class LeaseLost(DistillError):
    """Another driver took this driver's lease over: it must not submit or record anything."""


class UnitBeat:
    """While a unit runs, its heartbeat file (`beat`) is renewed every `heartbeat_s` seconds, so
    a unit recorded by a process on another host counts as live exactly while that process is;
    at each beat `owned()` is asked whether the manifest still names this process, and `lost` is
    set when it does not (another process took the unit over: this one stops without recording)."""

    def __init__(self, beat: Path | None, owned: Callable[[], bool], heartbeat_s: float = HEARTBEAT_S) -> None:
        self.beat, self.owned, self.heartbeat_s = beat, owned, heartbeat_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        if self.beat is not None:
            self.beat.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.beat, f"{time.time():.3f}\n")

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write()
                if not self.owned():
                    self.lost.set()
                    return
            except (OSError, DistillError):
                pass  # a beat missed is retried at the next; the unit's own writes report a full disk

    def __enter__(self) -> UnitBeat:
        if self.beat is not None:
            self._write()
            self._thread = threading.Thread(target=self._run, name="unit-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class RunLease:
    """`with RunLease(run_dir):` while a driver works on the run (see the module's docstring)."""

    def __init__(self, run_dir: Path, *, soft_lock: bool = False, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.path = Path(run_dir) / "driver.lease"
        self.heartbeat_s = heartbeat_s
        self._lock = (SoftFileLock if soft_lock else FileLock)(str(self.path) + ".lock", timeout=60)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.record: dict[str, Any] = {}

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> RunLease:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with holding(self._lock):
            held = self.read()
            holder = live_holder(held)
            if holder is not None:
                raise DistillError(
                    f"{self.path.parent}: another driver works on this run ({holder}, since {held.get('started')}); "
                    f"wait for it to end (`make status` shows its progress) or stop it{skew_hint(held)}")
            self.record = {**me(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "heartbeat": time.time()}
            atomic_write_text(self.path, json.dumps(self.record) + "\n")
        self._thread = threading.Thread(target=self._beat, name="driver-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with holding(self._lock):
                if self.read().get("pid") != self.record["pid"]:
                    return  # taken over: not ours to renew
                self.record["heartbeat"] = time.time()
                atomic_write_text(self.path, json.dumps(self.record) + "\n")

    def check(self) -> None:
        """Refuse to go on once another driver has taken the lease over (this one was stopped,
        or its host lost the filesystem, for longer than `STALE_S`): from then on that driver
        submits and records, and this one must do neither."""
        held = self.read()
        if (held.get("host"), held.get("pid")) != (self.record.get("host"), self.record.get("pid")):
            by = (f"pid {held.get('pid')} on {held.get('host')} (since {held.get('started')})" if held
                  else "another driver (which has ended since)")
            raise LeaseLost(f"{self.path.parent}: this driver's lease was taken over by {by} while this one was not "
                            "renewing it; stopped without submitting or recording anything more")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with holding(self._lock):
            if self.read().get("pid") == self.record.get("pid") and self.read().get("host") == self.record.get("host"):
                self.path.unlink(missing_ok=True)


@contextmanager
def holding(lock: BaseFileLock) -> Iterator[None]:
    """Hold a file lock; one that cannot be had within its timeout is one line naming its
    holder. A soft lock left by a process on another host (which this host cannot see die)
    is never broken silently: the user checks that process and removes the file."""
    try:
        lock.acquire()
    except Timeout:
        holder = ""
        try:
            pid, host = Path(lock.lock_file).read_text().split("\n")[:2]
            holder = f" by pid {pid} on {host}"
        except (OSError, ValueError):
            pass
        raise DistillError(
            f"{lock.lock_file}: held{holder} for more than {lock.timeout:.0f} s; if that process is gone "
            f"(a crash on another host leaves a soft lock behind), remove the file and rerun") from None
    try:
        yield
    finally:
        lock.release()
