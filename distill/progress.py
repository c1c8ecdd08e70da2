"""Progress bars that suit both a terminal and a batch log, and leave their figure on disk.

A job's bar is drawn in its log, which nobody watches. So while a unit runs
(`distill.runner.run_unit` sets the file with `reporting`), every bar also writes its figure
(`n`, `total`, `unit`, wall-clock `time`) to the unit's progress file, replaced atomically,
at most every `REPORT_EVERY_S` seconds and once more at close. `make status` and the driver
read those files to show how far each running unit is. They are separate files, not manifest
fields: the manifest is shared by every job under a lock and must not be rewritten per step.
A figure that cannot be written (a full disk) is skipped: progress never fails a job.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from distill.jsonl import atomic_write_text

log = logging.getLogger(__name__)

REPORT_EVERY_S = 5.0
_destination: Path | None = None  # the progress file of the unit this process runs, if any


@contextmanager
def reporting(path: Path | None) -> Iterator[None]:
    """Bars made inside this block write their figure to `path` (None: nowhere)."""
    global _destination
    previous, _destination = _destination, path
    try:
        yield
    finally:
        _destination = previous


class ProgressBar(tqdm):
    """A tqdm bar that also writes its figure to `report`, throttled. It counts even when
    disabled (tqdm stops counting then), so a unit run with `progress=False` still reports.
    The figure follows `update()`; iterating over the bar does not report."""

    def __init__(self, *args: Any, report: Path | None = None, report_every_s: float = REPORT_EVERY_S,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.report = report
        self.report_every_s = report_every_s
        self.report_unit = kwargs.get("unit", "it")  # tqdm does not keep it on a disabled bar
        self._reported_at = float("-inf")
        self._failed = False
        self._write_figure(force=True)  # a resumed unit shows where it starts at once

    def update(self, n: float | None = 1) -> bool | None:
        if self.disable:
            self.n += n or 0
        shown = super().update(n)
        self._write_figure()
        return shown

    def close(self) -> None:
        self._write_figure(force=True)
        self.report = None  # closed: a second close (tqdm's __del__) writes nothing
        super().close()

    def _write_figure(self, force: bool = False) -> None:
        report = getattr(self, "report", None)  # None also when __init__ failed before setting it
        if report is None or (not force and time.monotonic() - self._reported_at < self.report_every_s):
            return
        self._reported_at = time.monotonic()
        figure = {"n": self.n, "total": self.total, "unit": self.report_unit, "time": time.time()}
        try:
            atomic_write_text(report, json.dumps(figure) + "\n")
        except Exception as exc:  # best effort: the work matters, its progress figure does not
            if not self._failed:
                log.warning("progress not recorded in %s: %s", report, exc)
            self._failed = True


def progress_bar(**kwargs: Any) -> ProgressBar:
    """A tqdm bar on stderr. In a SLURM log (stderr not a terminal) it redraws at most every
    30 s: each redraw is a new line there, and a bar updated per step would fill the log."""
    kwargs.setdefault("file", sys.stderr)
    if not kwargs["file"].isatty():
        kwargs.setdefault("mininterval", 30.0)
    return ProgressBar(report=_destination, **kwargs)


def read_figure(path: Path) -> dict[str, Any] | None:
    """A unit's last figure, or None when it has written none (or it cannot be read)."""
    try:
        figure = json.loads(path.read_text())
        return figure if {"n", "total", "unit", "time"} <= figure.keys() else None
    except (OSError, ValueError, AttributeError):
        return None


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def _count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def describe(figures: list[dict[str, Any]], now: float | None = None) -> str:
    """Running units' figures on one line: `step 120/500 (8 s ago)`; several units counting
    the same thing summed, `problem 96/300 in 3 units (5 s ago)`, aged by the oldest figure;
    units counting different things listed one by one. "" for no figure."""
    if not figures:
        return ""
    now = time.time() if now is None else now
    age = ago(now - min(f["time"] for f in figures))
    units = {f["unit"] for f in figures}
    if len(units) > 1:
        return ", ".join(f"{f['unit']} {_count(f['n'])}/{_count(f['total'] or 0)}" for f in figures) + f" ({age})"
    n = sum(f["n"] for f in figures)
    total = sum(f["total"] or 0 for f in figures)
    where = f" in {len(figures)} units" if len(figures) > 1 else ""
    return f"{units.pop()} {_count(n)}/{_count(total)}{where} ({age})"


def fraction(figures: list[dict[str, Any]]) -> float:
    """How far the running units are on average, 0 to 1."""
    parts = [min(1.0, f["n"] / f["total"]) for f in figures if f["total"]]
    return sum(parts) / len(parts) if parts else 0.0
