"""One submitit-launchable callable per stage.

Each is a `Checkpointable`: when SLURM preempts or times out the job, submitit requeues the same
callable with the same arguments, and the stage resumes from what it left on disk (written
records, the newest complete checkpoint). The work itself lives in `distill.pipeline`.
"""

from __future__ import annotations

import os

import submitit

from distill import pipeline
from distill.config import RunConfig


def job_id() -> str | None:
    try:
        return submitit.JobEnvironment().job_id
    except RuntimeError:  # called outside a submitit job (tests, in-process runs)
        return None


def set_threads(threads: int | None) -> None:
    """One torch thread pool per CPU the job was given, not per CPU on the node."""
    import torch

    n = threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0"))
    if n > 0:
        torch.set_num_threads(n)


class GenerateShard(submitit.helpers.Checkpointable):
    def __call__(self, cfg: RunConfig, it: int, shard: int, threads: int | None = None) -> dict:
        set_threads(threads)
        return pipeline.generate_teacher_shard(cfg, it, shard, job_id=job_id())


class Mine(submitit.helpers.Checkpointable):
    def __call__(self, cfg: RunConfig, it: int, threads: int | None = None) -> dict:
        set_threads(threads)
        return pipeline.mine(cfg, it, job_id=job_id())


class Verify(submitit.helpers.Checkpointable):
    def __call__(self, cfg: RunConfig, it: int, threads: int | None = None) -> dict:
        return pipeline.verify(cfg, it, job_id=job_id())


class Train(submitit.helpers.Checkpointable):
    def __call__(self, cfg: RunConfig, it: int, threads: int | None = None, baseline: bool = False) -> dict:
        set_threads(threads)
        result = pipeline.train_student(cfg, it, baseline=baseline, job_id=job_id())
        return {"finished": result.finished, "step": result.step, "loss": result.loss}


class EvaluateShard(submitit.helpers.Checkpointable):
    def __call__(
        self, cfg: RunConfig, it: int, label: str, shard: int, threads: int | None = None, stage: str = "evaluate"
    ) -> dict:
        set_threads(threads)
        return pipeline.evaluate_shard(cfg, it, label, shard, stage=stage, job_id=job_id())
