"""One submitit-launchable callable per stage.

Each is a `Checkpointable`: when SLURM preempts the job or its time limit nears, SLURM sends USR2
(`--signal=USR2@<signal_delay_s>`), and submitit's handler pickles the callable again
(`checkpoint()`: same callable, same arguments), runs `scontrol requeue` and exits. The next
allocation resumes from what the stage left on disk. The work itself lives in `distill.pipeline`.

Generation, evaluation, mining and verification can be stopped anywhere (records are fsynced per
batch; outputs land by atomic rename), so they take submitit's handler as it is. Training cannot:
the handler runs between two bytecodes of the loop, possibly in the middle of an optimizer step.
`SafeStop` therefore takes USR2 over while training runs, turns it into a flag the loop checks
after each optimizer step (it then saves a checkpoint and returns), and only then hands the
signal to submitit's handler, which checkpoints, requeues and exits as usual; its
`max_num_timeout` bound still applies.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import submitit
from submitit.core.utils import UncompletedJobError

from distill import pipeline
from distill.config import RunConfig
from distill.manifest import Manifest, stage_entry

# The signal SLURM sends before a time limit or at preemption (submitit's choice, USR2 unless
# SUBMITIT_PREEMPT_SIGNAL says otherwise).
STOP_SIGNAL = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]
TOO_MANY_TIMEOUTS = ("timed out more often than the cluster profile's max_num_timeout allows; raise "
                     "time_min (or max_num_timeout) and run again: the work done so far is kept")


def job_id() -> str | None:
    """`123` or `123_4` (array task) inside a SLURM or submitit job, else None."""
    try:
        return submitit.JobEnvironment().job_id
    except RuntimeError:  # not a submitit job: a plain sbatch script, a test, an in-process run
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        if array:
            return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
        return os.environ.get("SLURM_JOB_ID")


def set_threads(threads: int | None) -> None:
    """One torch thread per CPU the job was given, not per CPU on the node: with SLURM's
    default of no CPU binding, two array tasks on one node would each start a thread per core,
    and oversubscribed OpenMP threads slow generation down many times over."""
    import torch

    n = threads or allocated_cpus()
    if n > 0:
        torch.set_num_threads(n)


def allocated_cpus() -> int:
    """CPUs of this SLURM job on this node (--cpus-per-task, else the allocation); 0 outside SLURM."""
    per_task = os.environ.get("SLURM_CPUS_PER_TASK")
    if per_task:
        return int(per_task)
    per_node = os.environ.get("SLURM_JOB_CPUS_PER_NODE", "")  # e.g. "2" or "4(x2)"
    digits = per_node.split("(")[0].split(",")[0]
    return int(digits) if digits.isdigit() else 0


# -- the manifest, seen from a job ----------------------------------------------------------------


def update_entry(cfg: RunConfig, it: int, stage: str, shard: str | None, change: Callable[[dict], None]) -> None:
    """Apply `change` to a stage's manifest entry, or to one shard's, under the manifest lock."""
    with Manifest(cfg.run_dir, soft_lock=cfg.lock == "soft").update() as data:
        entry = stage_entry(data, it, stage, create=True)
        if shard is not None:
            entry = entry.setdefault("shards", {}).setdefault(shard, {})
        change(entry)


def mark_requeued(cfg: RunConfig, it: int, stage: str, shard: str | None) -> None:
    """Pending again, not failed: the same job continues in its next allocation."""

    def change(entry: dict) -> None:
        entry["state"] = "pending"
        entry.pop("error", None)
        entry["requeued"] = entry.get("requeued", 0) + 1

    update_entry(cfg, it, stage, shard, change)


def mark_failed(cfg: RunConfig, it: int, stage: str, shard: str | None, error: str) -> None:
    def change(entry: dict) -> None:
        entry["state"] = "failed"
        entry["error"] = error[:300]

    update_entry(cfg, it, stage, shard, change)


def count_allocation(cfg: RunConfig, it: int, stage: str) -> None:
    """How many allocations a (resumable, requeued) stage has used, for the manifest."""

    def change(entry: dict) -> None:
        entry["allocations"] = entry.get("allocations", 0) + 1

    update_entry(cfg, it, stage, None, change)


@contextmanager
def requeue_recorded(cfg: RunConfig, it: int, stage: str, shard: str | None) -> Iterator[None]:
    """Record what submitit's signal handler did to the stage running inside this block.

    After a successful `scontrol requeue` the handler calls `sys.exit`; once the job has timed
    out `max_num_timeout` times it raises `UncompletedJobError` instead. The pipeline has marked
    the unit failed by then (it sees an exception either way); this corrects that.
    """
    try:
        yield
    except SystemExit:
        mark_requeued(cfg, it, stage, shard)
        raise
    except UncompletedJobError as exc:
        mark_failed(cfg, it, stage, shard, TOO_MANY_TIMEOUTS)
        # Re-raised with the explanation, which is what the driver shows from the job's traceback.
        raise UncompletedJobError(TOO_MANY_TIMEOUTS) from exc


class SafeStop:
    """While active, the stop signal only sets a flag; `hand_over` passes it on afterwards.

    Use as a context manager around work that polls `requested()` at safe points. Outside the
    main thread (where signal handlers cannot be set) it never reports a stop.
    """

    def __init__(self, signum: int = STOP_SIGNAL) -> None:
        self.signum = signum
        self.received: int | None = None
        self.previous: Any = None
        self.active = False

    def __enter__(self) -> SafeStop:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(self.signum, self._note)
            self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.signal(self.signum, self.previous)
            self.active = False

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            print(f"caught {signal.Signals(signum).name}: stopping at the next safe point", file=sys.stderr, flush=True)
        self.received = signum

    def requested(self) -> bool:
        return self.received is not None

    def hand_over(self) -> None:
        """Call the handler that was installed before (submitit's: checkpoint, requeue, exit).
        Returns only when there was none, e.g. outside a submitit job."""
        if self.received is not None and callable(self.previous):
            self.previous(self.received, None)


# -- the callables --------------------------------------------------------------------------------


class GenerateShard(submitit.helpers.Checkpointable):
    def __call__(self, cfg: RunConfig, it: int, shard: int, threads: int | None = None) -> dict:
        set_threads(threads)
        with requeue_recorded(cfg, it, "generate", str(shard)):
            return pipeline.generate_teacher_shard(cfg, it, shard, job_id=job_id())


class Mine(submitit.helpers.Checkpointable):
    def __call__(self, cfg: RunConfig, it: int, threads: int | None = None) -> dict:
        set_threads(threads)
        with requeue_recorded(cfg, it, "mine", None):
            return pipeline.mine(cfg, it, job_id=job_id())


class Verify(submitit.helpers.Checkpointable):
    def __call__(self, cfg: RunConfig, it: int, threads: int | None = None) -> dict:
        with requeue_recorded(cfg, it, "verify", None):
            return pipeline.verify(cfg, it, job_id=job_id())


class Train(submitit.helpers.Checkpointable):
    """Training that stops only at an optimizer-step boundary, with a checkpoint saved there."""

    def __call__(self, cfg: RunConfig, it: int, threads: int | None = None, baseline: bool = False) -> dict:
        stage = "baseline_train" if baseline else "train"
        with SafeStop() as stop:
            set_threads(threads)
            count_allocation(cfg, it, stage)
            result = pipeline.train_student(cfg, it, baseline=baseline, job_id=job_id(), should_stop=stop.requested)
            if not result.finished and stop.requested():
                with requeue_recorded(cfg, it, stage, None):
                    stop.hand_over()
        return {"finished": result.finished, "step": result.step, "loss": result.loss}


class EvaluateShard(submitit.helpers.Checkpointable):
    def __call__(
        self, cfg: RunConfig, it: int, label: str, shard: int, threads: int | None = None, stage: str = "evaluate"
    ) -> dict:
        set_threads(threads)
        with requeue_recorded(cfg, it, stage, f"{label}:{shard}"):
            return pipeline.evaluate_shard(cfg, it, label, shard, stage=stage, job_id=job_id())
