"""Training and evaluation curves for TensorBoard, kept equal to what the run recorded.

A training's curves are its checkpoint's loss history: when training starts or resumes, the
event files of its directory are written anew from the history of the checkpoint it resumes
from, and each logged step after that is appended. So a job killed after its last checkpoint,
whose events ran ahead of it, leaves no step twice, and a requeued job continues the same
curves. Evaluation curves (accuracy and response tokens per iteration) are rebuilt from the
manifest with the report. `tensorboard --logdir runs/<name>` (`make tensorboard`) shows both.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from distill.errors import DistillError

EVENTS = "events.out.tfevents.*"
log = logging.getLogger(__name__)


def writer(log_dir: Path) -> Any:
    """A SummaryWriter on an emptied `log_dir`."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DistillError("train.report_to: tensorboard is not installed (pip install tensorboard), "
                           "or set train.report_to: []") from None
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob(EVENTS):
        old.unlink()
    return SummaryWriter(str(log_dir))


class Curves:
    """One training's scalars (`train/<name>` per logged step); does nothing without a directory
    (another rank, or `report_to` without tensorboard). The curves are derived from the
    checkpoint's history, so one that cannot be written (a full disk) is given up with a
    warning, never the training: they are written whole again when training next starts."""

    def __init__(self, log_dir: Path | None, history: list[dict[str, Any]]) -> None:
        self.writer: Any = None
        if log_dir is not None:
            self._guarded(lambda: setattr(self, "writer", writer(log_dir)), log_dir)
        for row in history:
            self.add(row)

    def _guarded(self, write: Any, where: Any = None) -> None:
        try:
            write()
        except OSError as exc:
            log.warning("training curves in %s not written (%s); they are written anew from the checkpoint's "
                        "history when training next starts", where or self.writer.log_dir, exc)
            self.writer = None

    def add(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key not in ("step", "time") and value is not None and self.writer is not None:
                self._guarded(lambda k=key, v=value: self.writer.add_scalar(f"train/{k}", v, row["step"],
                                                                             walltime=row.get("time")))

    def flush(self) -> None:
        if self.writer is not None:
            self._guarded(self.writer.flush)

    def __enter__(self) -> Curves:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.writer is not None:
            with contextlib.suppress(OSError):
                self.writer.close()


def write_evaluations(log_dir: Path, rows: list[dict[str, Any]]) -> None:
    """The report's rows as curves over iterations: `eval/accuracy`, `eval/flexible_accuracy` and
    `eval/tokens_mean` of each model (`student`, `one-shot`), rewritten whole each time."""
    w = writer(log_dir)
    try:
        for row in rows:
            if row.get("iteration") is None:
                continue
            label = "one-shot" if row["model"].startswith("one-shot") else "student"
            for key in ("accuracy", "flexible_accuracy", "tokens_mean"):
                if row.get(key) is not None:
                    w.add_scalar(f"eval/{key}/{label}", row[key], row["iteration"])
    finally:
        w.close()
