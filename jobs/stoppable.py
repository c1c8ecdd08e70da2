"""One unit run so that SLURM's stop signal stops it at a safe point: the one routine every
launcher (a submitit job, `python -m jobs.sbatch` for the sbatch scripts, a torchrun rank)
runs a unit through. What a launcher does after a stop is its own: submitit's handler
requeues, the sbatch script requeues on exit status 3, a rank just ends."""

from __future__ import annotations

import signal

from distill.config import RunConfig
from distill.runner import Outcome, run_unit
from distill.stage import Stage
from jobs.allocation import job_id
from jobs.launch import RankLayout, run_distributed
from jobs.signals import STOP_SIGNAL, StopOnSignal

WITH_SIGTERM = (STOP_SIGNAL, signal.SIGTERM)


def run_stoppable(cfg: RunConfig, it: int, stage: Stage, key: str, ranks: RankLayout | None = None,
                  signums: tuple[int, ...] = (STOP_SIGNAL,),
                  progress: bool = True) -> tuple[Outcome | None, StopOnSignal]:
    """Run the unit with `signums` caught, in this process, or as torchrun ranks from this srun
    task (`ranks`; the signal is forwarded to them and they agree on the step to stop at).
    Returns its outcome (None in a task other than the first: that one reports for the job)
    and the catcher, which knows whether a signal came and which."""
    if ranks is not None:
        with StopOnSignal(False, signums) as stop:
            return run_distributed(cfg, it, stage, key, ranks, stop), stop
    with StopOnSignal(stage.stops_anywhere, signums) as stop:
        return run_unit(cfg, it, stage, key, job_id=job_id(), should_stop=stop.requested, progress=progress), stop
