"""The UNDO loop's decisions, the same for every launcher: after iteration N has finished,
whether its student improved on N-1's, and whether the loop goes on to N+1. The driver asks
after each iteration it runs; the plain sbatch path asks from a job at the end of an iteration's
chain (`python -m jobs.sbatch next`, slurm/undo.sh) and submits the next chain when told to.
Both read only the manifest, so a loop resumed after a stop decides as it would have."""

from __future__ import annotations

from dataclasses import dataclass

from distill.config import RunConfig
from distill.errors import DistillError
from distill.evaluation import EVALUATE
from distill.manifest import Manifest
from distill.records import StageRecord


@dataclass(frozen=True)
class Verdict:
    """How iteration `iteration`'s student did on the held-out split, against the one before."""

    iteration: int
    accuracy: float
    before: float | None  # iteration - 1's; None for iteration 0

    @property
    def improved(self) -> bool:
        return self.before is None or self.accuracy > self.before

    def line(self, run_dir: object = "") -> str:
        if self.before is None:
            return f"iter 0: all stages done; student accuracy {self.accuracy:.3f} ({run_dir})"
        verdict = "improved on" if self.improved else "did NOT improve on"
        return (f"iter {self.iteration}: student accuracy {self.accuracy:.3f} {verdict} iteration "
                f"{self.iteration - 1} ({self.before:.3f})")


def student_accuracy(manifest: Manifest, it: int) -> float:
    result = StageRecord.of(manifest.read(), it, EVALUATE.name).result("student")
    if result is None:
        raise DistillError(f"{manifest.path}: iteration {it}'s evaluation is not done; its student has no accuracy yet")
    return result.accuracy


def verdict(manifest: Manifest, it: int) -> Verdict:
    """The verdict on finished iteration `it`."""
    return Verdict(it, student_accuracy(manifest, it), student_accuracy(manifest, it - 1) if it > 0 else None)


def next_iteration(cfg: RunConfig, manifest: Manifest, it: int) -> tuple[int | None, str]:
    """After finished iteration `it`: the iteration to run next, or None with why the loop ends
    (empty when `undo.max_iters` is reached). It ends after `undo.patience` iterations in a row
    whose student did not improve on the one before."""
    if it >= cfg.undo.max_iters:
        return None, ""
    misses = 0
    for k in range(it, 0, -1):
        if verdict(manifest, k).improved:
            break
        misses += 1
    if misses >= cfg.undo.patience:
        return None, f"undo: stopping after iteration {it}: no improvement for {misses} iteration(s)"
    return it + 1, ""
