"""One unit of a stage as a submitit job: an array task of a sharded stage, or a single job.

A `Checkpointable`: when SLURM preempts the job or its time limit nears, the unit stops (at
once, or at training's next safe point), `distill.runner` records the stop, and submitit's own
handler pickles this callable again with the same arguments, runs `scontrol requeue` and exits;
the next allocation resumes from what the unit left on disk. Its `max_num_timeout` bound still
applies: past it the unit is recorded failed with the reason.
"""

from __future__ import annotations

from typing import Any

import submitit
from submitit.core.utils import UncompletedJobError

from distill.config import RunConfig
from distill.runner import fail_unit, requeued_unit, unit_done
from distill.stage import Stage
from jobs.allocation import set_threads
from jobs.launch import RankLayout
from jobs.stoppable import run_stoppable

TOO_MANY_TIMEOUTS = ("timed out more often than the cluster profile's max_num_timeout allows; raise "
                     "time_min (or max_num_timeout) and run again: the work done so far is kept")


class UnitFailed(RuntimeError):
    """The unit failed; its one-line reason is in the manifest too."""


class UnitJob(submitit.helpers.Checkpointable):
    def __call__(self, cfg: RunConfig, it: int, stage: Stage, key: str, threads: int | None = None,
                 ranks: RankLayout | None = None) -> dict[str, Any]:
        if unit_done(cfg, it, stage, key):  # e.g. requeued by a signal that came as it finished
            return {}
        set_threads(threads)
        outcome, stop = run_stoppable(cfg, it, stage, key, ranks)  # with ranks: torchrun in every srun task
        if outcome is None:  # not the task of global rank 0: rank 0's task reports
            return {}
        if outcome.state == "stopped":
            try:
                stop.hand_over()  # submitit's handler: checkpoint, requeue, exit
            except SystemExit:
                requeued_unit(cfg, it, stage, key)
                raise
            except UncompletedJobError as exc:
                fail_unit(cfg, it, stage, key, TOO_MANY_TIMEOUTS)
                # Re-raised with the explanation, which is what the driver shows.
                raise UncompletedJobError(TOO_MANY_TIMEOUTS) from exc
        elif outcome.state == "failed":
            raise UnitFailed(f"{stage.describe(key)}: {outcome.error}")
        return outcome.fields
