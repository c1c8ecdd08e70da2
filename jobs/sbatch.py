"""`python -m jobs.sbatch`: one unit of one stage (a shard, or a whole single-unit stage) in this
process, for running an iteration with plain sbatch scripts (slurm/unit.sbatch) instead of the driver.

It keeps the driver's rules: the run's manifest says what is done (a done unit exits at once),
every unit resumes from what it left on disk, and the merge refuses incomplete shards. On the
stop signal (USR2, which `#SBATCH --signal=B:USR2@90` makes SLURM send to the batch script, and
the script forwards here) the unit stops (training after its current optimizer step, with a
checkpoint) and the process exits with status 3; the script then requeues its job, at most
`--max-requeues` times.

Distributed training (`train.distributed: ddp|fsdp`) in a job of several tasks (`sbatch
--nodes=2 --ntasks-per-node=1 --gres=gpu:H100:4 slurm/unit.sbatch train ...`): the script starts this
command in every task with srun (which forwards USR2 to each). Every task makes the same checks
(done, submitted elsewhere: reads of the manifest and squeue; the run's creation, which only a
first use writes, atomically) and then runs torchrun, a process a GPU of its node, the ranks
meeting on the first host (`jobs.launch`). Rank 0 records the unit; once the ranks have ended,
task 0 reads what it recorded and exits as one process would (3: requeue me) while the other
tasks exit 0. Only task 0 prints the checks' findings. A stage that is not distributed refuses
a job of several tasks (status 2), and one task with one GPU (or none) trains as one process.

    python -m jobs.sbatch generate --config C --iter N --shard $SLURM_ARRAY_TASK_ID
    python -m jobs.sbatch merge generate --config C --iter N
    python -m jobs.sbatch count evaluate --config C --iter N     # -> array size, e.g. 3
    python -m jobs.sbatch prepare --config C --iter N            # on the login node, first
    python -m jobs.sbatch chain --config C --iter N              # the stages slurm/iteration.sh submits
    python -m jobs.sbatch next --config C --iter N               # after iteration N: the next one, or nothing

Exit status: 0 done, 1 failed, 2 bad input, 3 stopped by the signal: requeue me, 143 stopped
by SIGTERM (recorded as stopped; a later run resumes), 130 stopped by Ctrl-C (recorded failed;
a later run resumes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys

from distill import pipeline
from distill.compatibility import check_pair
from distill.config import RunConfig, load_config
from distill.errors import DistillError
from distill.hub import record_models, resolve_models
from distill.interrupts import run_command
from distill.preflight import check_inputs
from distill.runner import (
    check_run,
    fail_unit,
    manifest_of,
    merge_stage,
    open_run,
    requeued_unit,
    unit_done,
)
from distill.stage import Stage
from distill.typed_yaml import at_least
from jobs.allocation import first_task, job_id, set_threads, step_tasks
from jobs.launch import RankLayout, ranks_in_step
from jobs.queue import in_flight, queue_states
from jobs.signals import STOP_SIGNAL
from jobs.stoppable import WITH_SIGTERM, run_stoppable

REQUEUE = 3
TERMINATED = 128 + signal.SIGTERM


def requeue_or_fail(cfg: RunConfig, it: int, stage: Stage, key: str, max_requeues: int) -> int:
    """Exit status after a stop: REQUEUE while requeues are left, else a failure in the manifest."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_requeues:
        fail_unit(cfg, it, stage, key,
                  f"stopped by {STOP_SIGNAL.name} in allocation {restarts + 1}, not requeued again "
                  f"(--max-requeues {max_requeues}); raise --time and submit again: the work done so far is kept")
        print(f"{stage.name}: stopped; {restarts} requeue(s) already, not requeued again", file=sys.stderr)
        return 1
    requeued_unit(cfg, it, stage, key)
    print(f"{stage.name}: stopped at a safe point; requeue me", file=sys.stderr)
    return REQUEUE


def unit_key(cfg: RunConfig, it: int, stage: Stage, index: int | None) -> str:
    """The key of array task `index` of a sharded stage ("0" for a single-unit stage)."""
    if not stage.sharded:
        return "0"
    keys = stage.units(cfg, it)
    if index is None or not 0 <= index < len(keys):
        raise DistillError(f"{stage.name}: --shard {index} out of range: this iteration has {len(keys)} "
                           f"{stage.unit_name}(s), 0-{len(keys) - 1} (see `count {stage.name}`)")
    return keys[index]


def refuse_if_submitted(cfg: RunConfig, it: int, stage: Stage, key: str) -> None:
    """A unit whose recorded job (a driver's, or another script's) is still in squeue is not
    started again by hand; its own job, requeued, goes on."""
    recorded = manifest_of(cfg).stage(it, stage.name).get("job_ids", {}).get(key)
    if recorded is None or recorded == job_id() or shutil.which("squeue") is None:
        return
    states = queue_states()
    if states is not None and in_flight(states, recorded):
        raise DistillError(f"{stage.describe(key)} is submitted as job {recorded} ({states[recorded][0]}); "
                           f"not started twice: wait for it, or `scancel {recorded}` first")


def ranks_of(cfg: RunConfig, stage: Stage) -> RankLayout | None:
    """The unit's torchrun layout in this job (None: one process). A stage that runs as one
    process refuses a job of several tasks: each would run the whole unit again."""
    tasks = step_tasks()
    if tasks > 1 and not stage.runs_distributed(cfg):
        raise DistillError(f"{stage.name}: this job has {tasks} tasks, but {stage.name} runs as one process (only "
                           "training runs on several, with train.distributed: ddp or fsdp): each task would run it "
                           "again; submit it with one task")
    return ranks_in_step(cfg, stage)


def chosen_stage(args: argparse.Namespace) -> Stage:
    name = args.command if args.command not in ("merge", "count") else args.what
    return pipeline.stage(f"baseline_{name}" if getattr(args, "baseline", False) else name)


def prepare(cfg: RunConfig, it: int, accept_data: bool = False) -> None:
    """What the driver does before it submits, for the plain sbatch scripts: check every input,
    refuse a changed config or data file, refuse an iteration whose previous one is not finished,
    resolve hub models into the Hugging Face cache (the jobs may have no internet), check that
    teacher and student fit together (`distill.compatibility`), then create
    the run directory and record them."""
    for note in check_inputs(cfg, it):
        print(note)
    check_run(cfg, accept_data=accept_data)
    if it > 0:
        pipeline.require_finished(manifest_of(cfg).read(), cfg, it - 1,
                                  f"slurm/iteration.sh {cfg.source} {it - 1}")
    models = resolve_models(cfg, manifest_of(cfg).read().get("models", {}))
    for note in check_pair(cfg, models):
        print(note)
    open_run(cfg, record=True, accept_data=accept_data)
    record_models(manifest_of(cfg), models)
    print(f"{cfg.run_dir}: ready" + "".join(f"; models.{k}: {v['path']}" for k, v in models.items()))


def chain(cfg: RunConfig, it: int, baseline: bool) -> list[str]:
    """The plan of iteration `it` (or its one-shot baseline) as the sbatch chain submits it, one
    line per stage: its name, how many units it has, whether they run as an array (then a merge
    follows), and the cluster-profile section whose settings its jobs take."""
    plan = pipeline.baseline_plan() if baseline else pipeline.iteration_plan(it, cfg)
    return [f"{s.name} {len(s.units(cfg, it)) if s.sharded else 1} {int(s.sharded)} {s.resource_section}" for s in plan]


def next_iteration(cfg: RunConfig, it: int) -> str:
    """For slurm/undo.sh after iteration `it`'s chain: the next iteration, or nothing."""
    from distill import undo

    manifest = manifest_of(cfg)
    for stage in pipeline.iteration_plan(it, cfg):
        if not manifest.is_done(it, stage.name):
            raise DistillError(f"iteration {it}: {stage.name} is not done; the chain did not finish")
    print(undo.verdict(manifest, it).line(cfg.run_dir), file=sys.stderr)
    following, why = undo.next_iteration(cfg, manifest, it)
    if following is None:
        print(why or f"undo: iteration {it} is undo.max_iters", file=sys.stderr)
        return ""
    return str(following)


def run(args: argparse.Namespace, cfg: RunConfig) -> int:
    if args.command == "prepare":
        prepare(cfg, args.iteration, args.accept_data_change)
        return 0
    if args.command == "chain":
        print("\n".join(chain(cfg, args.iteration, args.baseline)))
        return 0
    if args.command == "next":
        print(next_iteration(cfg, args.iteration))
        return 0
    it, stage = args.iteration, chosen_stage(args)
    if args.command == "count":
        print(len(stage.units(cfg, it)))
        return 0
    ranks = ranks_of(cfg, stage)
    if args.command == "merge":
        if manifest_of(cfg).is_done(it, stage.name):
            print(f"{stage.name}: already merged")
        else:
            merge_stage(cfg, it, stage)
            print(stage.summary(manifest_of(cfg).stage(it, stage.name)))
        return 0
    open_run(cfg)  # refuses a config that differs from the run's
    key = unit_key(cfg, it, stage, getattr(args, "shard", None))
    if unit_done(cfg, it, stage, key):
        if first_task():
            print(f"{stage.describe(key)}: already done")
        return 0
    refuse_if_submitted(cfg, it, stage, key)
    if ranks is None:
        set_threads(None)
    # With ranks: this task's torchrun ranks, with every other task's (jobs.launch).
    outcome, stop = run_stoppable(cfg, it, stage, key, ranks, WITH_SIGTERM)
    if outcome is None:
        return 0  # not task 0: task 0 reports for the job
    if outcome.state == "stopped" and stop.received == signal.SIGTERM:
        # Cancelled (or preempted, which SLURM requeues itself): stopped, not requeued by us.
        print(f"{stage.describe(key)}: stopped by SIGTERM at a safe point; run again to resume", file=sys.stderr)
        return TERMINATED
    if outcome.state == "stopped":
        return requeue_or_fail(cfg, it, stage, key, args.max_requeues)
    if outcome.state == "failed":
        print(f"error: {stage.describe(key)}: {outcome.error}", file=sys.stderr)
        return 2 if outcome.bad_input else 1
    print(json.dumps(outcome.fields.get("metrics", outcome.fields)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per registered stage (plus merge and count for the sharded ones)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.sbatch", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True, help="YAML config")
    common.add_argument("--iter", type=at_least(0), required=True, dest="iteration", help="iteration number")
    common.add_argument("--run", help="run name (default: the config's name)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    common.add_argument("--max-requeues", type=at_least(0), default=int(os.environ.get("DISTILL_MAX_REQUEUES", "3")),
                        help="stops after this many requeues fail the unit (default: $DISTILL_MAX_REQUEUES or 3)")
    sub = parser.add_subparsers(dest="command", required=True)
    names = pipeline.names()
    for stage in pipeline.STAGES:  # a baseline stage also runs as `<stage> --baseline`
        doc = (stage.run.__doc__ or stage.name).strip().splitlines()[0]
        p = sub.add_parser(stage.name, parents=[common], help=doc)
        if stage.sharded:
            p.add_argument("--shard", type=at_least(0), required=True,
                           help=f"{stage.unit_name} index ($SLURM_ARRAY_TASK_ID), 0 to `count {stage.name}` - 1")
        if f"baseline_{stage.name}" in names:
            p.add_argument("--baseline", action="store_true", help=f"the one-shot baseline's {stage.name}")
    sharded = sorted({s.name for s in pipeline.STAGES if s.sharded}, key=names.index)
    for name, text in (("merge", "merge the units of a stage once all are done"),
                       ("count", "print how many array tasks a stage has")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("what", choices=sharded)
    p = sub.add_parser("chain", parents=[common], help="the stages of an iteration as slurm/iteration.sh submits them")
    p.add_argument("--baseline", action="store_true", help="the one-shot baseline's stages")
    sub.add_parser("next", parents=[common], help="after an iteration: the UNDO iteration to run next (slurm/undo.sh)")
    p = sub.add_parser("prepare", parents=[common],
                       help="check inputs, resolve hub models, create the run (login node)")
    p.add_argument("--accept-data-change", action="store_true",
                   help="go on although a data file differs from what the run recorded (recorded in its history)")
    return parser


def import_plugins(argv: list[str] | None) -> None:
    """Load the config once before the parser is built, for its `plugins`: a stage they
    register is then a subcommand like the others. Errors wait for the real load."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--set", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    if known.config:
        with contextlib.suppress(DistillError):
            load_config(known.config, known.set)


def main(argv: list[str] | None = None) -> int:
    import_plugins(argv)
    args = build_parser().parse_args(argv)
    overrides = list(args.set) + ([f"name={args.run}"] if args.run is not None else [])
    # In a job of several tasks each finds the same error: the first one says it.
    return run_command(lambda: run(args, load_config(args.config, overrides)),
                       lambda: "stopped; rerun the same command to resume", speak=first_task())


if __name__ == "__main__":
    sys.exit(main())
