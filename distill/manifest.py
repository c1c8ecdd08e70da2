"""The run manifest: what each iteration has finished, shared by every job of a run.

Many jobs (array tasks on several nodes, the driver on a login node) update it at once, so
every change is a read-modify-write under a lock file, and the new content replaces the old
with an atomic rename: a reader never sees a half-written file, and no update is lost. The
version before each update is kept beside it (`manifest.json.prev`); `distill.repair` rebuilds
a lost or damaged manifest from the outputs on disk. This module holds the file and its
primitive writes; which state a unit or stage is in is decided by `distill.runner`, the only
caller of those writes.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, SoftFileLock

from distill.errors import DistillError, NoSpace, no_space
from distill.jsonl import atomic_write_text
from distill.layout import RunPaths
from distill.lease import holding, pid_alive
from distill.progress import describe, read_figure

STATES = ("pending", "running", "done", "failed")
LOCK_TIMEOUT_S = 120.0  # an update holds the lock for milliseconds: waiting longer means a stale lock


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())


class Manifest:
    """`runs/<name>/manifest.json` plus its lock file."""

    def __init__(self, run_dir: str | Path, *, soft_lock: bool = False, timeout: float | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = RunPaths(self.run_dir).manifest
        lock_cls = SoftFileLock if soft_lock else FileLock
        self._lock = lock_cls(str(self.path) + ".lock", timeout=LOCK_TIMEOUT_S if timeout is None else timeout)

    @property
    def previous(self) -> Path:
        """The manifest before its last update, for a look or a copy back by hand."""
        return self.path.with_name(self.path.name + ".prev")

    def read(self) -> dict[str, Any]:
        """A consistent snapshot; needs no lock because writes are atomic renames."""
        if not self.path.exists():
            return {"iterations": {}}
        try:
            return json.loads(self.path.read_text())
        except json.JSONDecodeError as exc:
            raise DistillError(
                f"{self.path}:{exc.lineno}: manifest is not valid JSON ({exc.msg}); its previous version is "
                f"{self.previous.name}, and `python -m distill repair --run {self.run_dir}` rebuilds it from what is "
                "on disk") from None

    @contextmanager
    def update(self) -> Iterator[dict[str, Any]]:
        """Yield the current content for in-place edits; they land when the block exits cleanly."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with holding(self._lock):
            data = self.read()
            yield data
            try:
                if self.path.exists():
                    atomic_write_text(self.previous, self.path.read_text())
                atomic_write_text(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")
            except NoSpace:
                raise no_space(self.path) from None  # the manifest is what could not be written

    def check_lock(self) -> None:
        """Take the lock and let go: a stale lock shows here, before anything is submitted."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with holding(self._lock):
            pass

    # -- views -------------------------------------------------------------------------------

    def stage(self, iteration: int, stage: str) -> dict[str, Any]:
        return stage_entry(self.read(), iteration, stage)

    def is_done(self, iteration: int, stage: str) -> bool:
        return self.stage(iteration, stage).get("state") == "done"

    # -- writes ------------------------------------------------------------------------------

    def mark(self, iteration: int, stage: str, state: str, **fields: Any) -> None:
        """Set a stage's state and merge `fields` into its entry, stamping start/end times."""
        with self.update() as data:
            set_stage_state(stage_entry(data, iteration, stage, create=True), state, **fields)

    def mark_shard(self, iteration: int, stage: str, shard: str, state: str, **fields: Any) -> None:
        with self.update() as data:
            entry = stage_entry(data, iteration, stage, create=True)
            entry.setdefault("state", "running")
            set_shard_state(entry.setdefault("shards", {}).setdefault(str(shard), {}), state, **fields)

    def add_job_ids(self, iteration: int, stage: str, job_ids: dict[str, str]) -> None:
        """Remember which job runs which shard (`"0": "1234_0"`), so the driver can ask squeue."""
        with self.update() as data:
            entry = stage_entry(data, iteration, stage, create=True)
            entry.setdefault("state", "pending")
            entry.setdefault("job_ids", {}).update(job_ids)

    def set_meta(self, **fields: Any) -> None:
        with self.update() as data:
            data.update(fields)


def set_stage_state(entry: dict[str, Any], state: str, **fields: Any) -> None:
    assert state in STATES, state
    if state == "running" and entry.get("state") != "running":
        entry["started"] = now()
        entry.pop("ended", None)
        entry.pop("error", None)
    if state in ("done", "failed"):
        entry["ended"] = now()
    if state == "done":
        entry.pop("error", None)
    entry["state"] = state
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(entry.get(key), dict):
            entry[key].update(value)
        else:
            entry[key] = value


def set_shard_state(entry: dict[str, Any], state: str, **fields: Any) -> None:
    assert state in STATES, state
    if state == "running":
        entry["started"] = now()
        entry["attempts"] = entry.get("attempts", 0) + 1
    if state in ("done", "failed"):
        entry["ended"] = now()
    entry["state"] = state
    entry.update(fields)


def stage_entry(data: dict[str, Any], iteration: int, stage: str, create: bool = False) -> dict[str, Any]:
    iters = data.setdefault("iterations", {}) if create else data.get("iterations", {})
    it = iters.setdefault(str(iteration), {"stages": {}}) if create else iters.get(str(iteration), {})
    stages = it.setdefault("stages", {}) if create else it.get("stages", {})
    return stages.setdefault(stage, {}) if create else stages.get(stage, {})


def format_table(data: dict[str, Any], order: Sequence[str] = (), run_dir: Path | None = None) -> str:
    """The manifest as a table: one row per iteration and stage, stages in `order` (pipeline
    order), any other stage after them by name. Given the run directory, a running stage's
    detail is its running units' progress (`step 120/500 (8 s ago)`)."""
    rows = [("iter", "stage", "state", "shards", "started", "ended", "detail")]
    for it in sorted(data.get("iterations", {}), key=int):
        stages = data["iterations"][it].get("stages", {})
        for name in sorted(stages, key=lambda n: (order.index(n) if n in order else len(order), n)):
            entry = stages[name]
            shards = entry.get("shards", {})
            total = entry.get("num_shards", len(shards))
            done = sum(1 for s in shards.values() if s.get("state") == "done")
            shard_text = f"{done}/{total}" if total else "-"
            state = shown_state(entry)
            progress = describe(running_figures(run_dir, int(it), name, entry)) if run_dir else ""
            detail = progress or entry.get("error") or _summary(entry.get("metrics", {}))
            started = entry.get("started") or min((s["started"] for s in shards.values() if "started" in s),
                                                  default="-")
            rows.append((it, name, state, shard_text, started, entry.get("ended", "-"), detail))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        cells = [str(c).ljust(w) for c, w in zip(r[:-1], widths, strict=False)]
        lines.append("  ".join(cells + [str(r[-1])]).rstrip())
    return "\n".join(lines)


def shown_state(entry: dict[str, Any]) -> str:
    """The state to show. A stage with units recorded running is `running` whatever its own
    state (a sharded stage's stays `pending` from the submission of its jobs until their
    merge), and `interrupted` when those units' processes, all on this host, are gone (killed
    without a chance to record it); a rerun resumes it. Units on other hosts cannot be seen
    from here and keep their recorded state."""
    state = entry.get("state", "pending")
    running = [unit for _, unit in running_units(entry)]
    if state == "done" or not running:
        return state
    return "interrupted" if all(gone(unit) for unit in running) else "running"


def running_units(entry: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(key, entry) of a stage's units recorded running; a single-unit stage's unit is "0"."""
    units = entry["shards"].items() if "shards" in entry else [("0", entry)]
    return [(key, unit) for key, unit in units if unit.get("state") == "running"]


def gone(unit: dict[str, Any]) -> bool:
    """A unit recorded running by a process of this host that no longer runs."""
    return unit.get("host") == socket.gethostname() and bool(unit.get("pid")) and not pid_alive(int(unit["pid"]))


def running_figures(run_dir: Path, iteration: int, stage: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The last progress figures of a stage's running units, in unit order; a unit that has
    written none yet (still loading its model), or whose process is gone, has none."""
    paths = RunPaths(run_dir)
    figures = [read_figure(paths.progress(iteration, stage, key)) for key, unit in running_units(entry)
               if not gone(unit)]
    return [f for f in figures if f is not None]


def _summary(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif isinstance(value, (int, str)):
            parts.append(f"{key}={value}")
    return " ".join(parts[:5])
