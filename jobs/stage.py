"""`python -m jobs.stage`: one unit of one stage (a shard, or a whole single-job stage) in this
process, for running an iteration with plain sbatch scripts (slurm/*.sbatch) instead of the driver.

It keeps the driver's rules: the run's manifest says what is done (a done unit exits at once),
every unit resumes from what it left on disk, and the merge refuses incomplete shards. On the
stop signal (USR2, which `#SBATCH --signal=B:USR2@90` makes SLURM send to the batch script, and
the script forwards here) training stops after its current optimizer step and saves; the other
stages stop at once (they are safe to stop anywhere). It then exits with status 3, and the script
requeues the job, at most `--max-requeues` times.

    python -m jobs.stage generate --config C --iter N --shard $SLURM_ARRAY_TASK_ID
    python -m jobs.stage merge generate --config C --iter N
    python -m jobs.stage count evaluate --config C --iter N     # -> array size, e.g. 3

Exit status: 0 done, 1 failed, 2 bad input, 3 stopped by the signal: requeue me.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from distill import pipeline
from distill.config import RunConfig, load_config
from distill.errors import DistillError
from distill.manifest import Manifest
from jobs.stages import STOP_SIGNAL, SafeStop, job_id, mark_failed, mark_requeued, set_threads

REQUEUE = 3
SHARDED = ("generate", "evaluate", "baseline_evaluate")


class Stopped(BaseException):
    """Raised by the stop-signal handler in stages that can stop anywhere.

    A BaseException, like KeyboardInterrupt, so no `except Exception` on the way swallows it."""


@contextmanager
def stop_at_once() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise Stopped(signal.Signals(signum).name)

    previous = signal.signal(STOP_SIGNAL, handler)
    try:
        yield
    finally:
        signal.signal(STOP_SIGNAL, previous)


def requeue_or_fail(cfg: RunConfig, it: int, stage: str, shard: str | None, max_requeues: int) -> int:
    """Exit status after a stop: REQUEUE while requeues are left, else a failure in the manifest."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_requeues:
        mark_failed(cfg, it, stage, shard,
                    f"stopped by {STOP_SIGNAL.name} in allocation {restarts + 1}, not requeued again "
                    f"(--max-requeues {max_requeues}); raise --time and submit again: the work done so far is kept")
        print(f"{stage}: stopped; {restarts} requeue(s) already, not requeued again", file=sys.stderr)
        return 1
    mark_requeued(cfg, it, stage, shard)
    print(f"{stage}: stopped at a safe point; requeue me", file=sys.stderr)
    return REQUEUE


def unit_done(cfg: RunConfig, it: int, stage: str, shard: str | None) -> bool:
    entry = Manifest(cfg.run_dir).stage(it, stage)
    if shard is not None:
        entry = entry.get("shards", {}).get(shard, {})
    return entry.get("state") == "done"


def eval_unit(cfg: RunConfig, it: int, stage: str, index: int) -> tuple[str, int]:
    units = pipeline.eval_units(cfg, it, stage)
    if not 0 <= index < len(units):
        raise DistillError(f"{stage}: --shard {index} out of range: this iteration has {len(units)} "
                           f"evaluation task(s), 0-{len(units) - 1} (see `count {stage}`)")
    return units[index]


def run(args: argparse.Namespace, cfg: RunConfig) -> int:
    it, cmd = args.iteration, args.command
    if cmd == "count":
        print(cfg.generation.num_shards if args.what == "generate" else len(pipeline.eval_units(cfg, it, args.what)))
        return 0
    if cmd == "merge":
        if Manifest(cfg.run_dir).is_done(it, args.what):
            print(f"{args.what}: already merged")
        elif args.what == "generate":
            print(f"generate: merged {pipeline.merge_generation(cfg, it)} records")
        else:
            print(json.dumps(pipeline.merge_evaluation(cfg, it, args.what)))
        return 0

    pipeline.open_run(cfg)  # refuses a config that differs from the run's
    stage = ("baseline_" + cmd) if getattr(args, "baseline", False) else cmd
    if cmd == "generate":
        shard: str | None = str(args.shard)
    elif cmd == "evaluate":
        label, num = eval_unit(cfg, it, stage, args.shard)
        shard = f"{label}:{num}"
    else:
        shard = None
    if unit_done(cfg, it, stage, shard):
        print(f"{stage}{f' {shard}' if shard else ''}: already done")
        return 0
    set_threads(None)
    if cmd == "train":
        with SafeStop() as stop:
            result = pipeline.train_student(cfg, it, baseline=args.baseline, job_id=job_id(), should_stop=stop.requested)
        if not result.finished:
            return requeue_or_fail(cfg, it, stage, None, args.max_requeues)
        print(json.dumps({"finished": result.finished, "step": result.step, "loss": result.loss}))
        return 0
    try:
        with stop_at_once():
            if cmd == "generate":
                out = pipeline.generate_teacher_shard(cfg, it, args.shard, job_id=job_id())
            elif cmd == "evaluate":
                out = pipeline.evaluate_shard(cfg, it, label, num, stage=stage, job_id=job_id())
            elif cmd == "verify":
                out = pipeline.verify(cfg, it, job_id=job_id())
            else:
                out = pipeline.mine(cfg, it, job_id=job_id())
    except Stopped:
        return requeue_or_fail(cfg, it, stage, shard, args.max_requeues)
    print(json.dumps(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.stage", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True, help="YAML config")
    common.add_argument("--iter", type=int, required=True, dest="iteration", help="iteration number")
    common.add_argument("--run", help="run name (default: the config's name)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    common.add_argument("--max-requeues", type=int, default=int(os.environ.get("DISTILL_MAX_REQUEUES", "3")),
                        help="stops after this many requeues fail the unit (default: $DISTILL_MAX_REQUEUES or 3)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", parents=[common], help="one teacher generation shard")
    p.add_argument("--shard", type=int, required=True, help="shard index ($SLURM_ARRAY_TASK_ID)")
    p = sub.add_parser("evaluate", parents=[common], help="one evaluation task: a (model, shard) pair")
    p.add_argument("--shard", type=int, required=True, help="task index ($SLURM_ARRAY_TASK_ID), 0 to `count evaluate` - 1")
    p.add_argument("--baseline", action="store_true", help="evaluate the one-shot baseline student")
    sub.add_parser("mine", parents=[common], help="probe the previous student for errors (iterations >= 1)")
    sub.add_parser("verify", parents=[common], help="grade the merged generations")
    p = sub.add_parser("train", parents=[common], help="train the student (resumes from its newest checkpoint)")
    p.add_argument("--baseline", action="store_true", help="train the one-shot baseline student")
    for name, text in (("merge", "merge the shards of a stage once all are done"),
                       ("count", "print how many array tasks a stage has")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("what", choices=SHARDED)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, list(args.set) + ([f"name={args.run}"] if args.run else []))
        return run(args, cfg)
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
