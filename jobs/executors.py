"""Executor selection: SLURM when `sbatch` is reachable, local subprocesses otherwise."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import submitit

from jobs.cluster import ClusterProfile

Kind = Literal["auto", "slurm", "local", "debug"]


def resolve_kind(kind: str | None) -> str:
    """`auto` (default, or EXECUTOR env) becomes `slurm` when sbatch is on PATH, else `local`."""
    kind = kind or os.environ.get("EXECUTOR") or "auto"
    if kind not in ("auto", "slurm", "local", "debug"):
        raise ValueError(f"EXECUTOR must be auto, slurm, local or debug, got {kind!r}")
    if kind == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    return kind


def make_executor(
    kind: str, folder: Path, *, name: str, timeout_min: int = 24 * 60,
    profile: ClusterProfile | None = None, stage: str = "",
) -> submitit.AutoExecutor:
    """An executor whose logs go to `folder` (on a filesystem the compute nodes share).

    With SLURM, `profile` gives the sbatch settings of `stage`'s jobs; the local executors
    ignore it (they run on this machine, with `timeout_min`).
    """
    if kind == "slurm":
        profile = profile or ClusterProfile()
        executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=kind,
                                         slurm_max_num_timeout=profile.max_num_timeout)
        executor.update_parameters(name=name, **profile.executor_parameters(stage))
        return executor
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=kind)
    executor.update_parameters(name=name, timeout_min=timeout_min)
    return executor


def attach(kind: str, folder: Path, job_id: str) -> submitit.Job:
    """A handle on a job an earlier driver submitted, so this driver waits for its result
    instead of submitting it again. SLURM only: local jobs are children of their driver."""
    assert kind == "slurm", kind
    return submitit.SlurmJob(folder=str(folder / "%j"), job_id=job_id)


def local_threads(parallel_jobs: int) -> int | None:
    """Split this machine's cores between the jobs the local executor runs at once."""
    return max(1, (os.cpu_count() or 1) // max(1, parallel_jobs))


@contextlib.contextmanager
def controller_stderr(kind: str, folder: Path) -> Iterator[None]:
    """Around the submission of local jobs: submitit starts one controller process per job,
    which inherits the driver's stderr and prints a traceback there when Ctrl-C reaches it.
    Inside this block the driver's stderr is `folder/controllers.err`, so the controllers get
    that file and the terminal keeps the driver's one line. The jobs' own logs are unchanged."""
    if kind != "local":
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(folder / "controllers.err", "a") as log:
            os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
