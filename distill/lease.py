"""One driver per run: a lease held while a driver works on a run.

Two drivers of one run would both see a stage missing and both submit it (with the local
executor nothing else tells them apart), so the driver takes `driver.lease` first: a small file
naming its host, pid and start time, with a heartbeat it renews every `HEARTBEAT_S` seconds from
a thread. A second driver refuses with one line naming the holder. A lease whose holder is gone
is taken over: on the same host, when its pid no longer runs; from another host (two login
nodes), when its heartbeat is older than `STALE_S`.

Units have a lighter guard of the same kind: a unit records its host and pid while it runs,
and `live_holder` says whether that process still runs, so the same unit is never started
twice by hand beside a driver's job (`distill.runner`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


def live_holder(record: dict[str, Any], stale_s: float = STALE_S) -> str | None:
    """"pid P on host H" when the process a record names still runs (or, on another host,
    renewed its heartbeat within `stale_s`), else None."""
    host, pid = record.get("host"), record.get("pid")
    if host is None or pid is None or (host, pid) == (me()["host"], me()["pid"]):
        return None
    if host == socket.gethostname():
        alive = pid_alive(int(pid))
    else:
        alive = time.time() - float(record.get("heartbeat", 0)) < stale_s
    return f"pid {pid} on {host}" if alive else None


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
                    f"wait for it to end (`make status` shows its progress) or stop it")
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
