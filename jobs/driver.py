"""The iteration driver: does whatever the manifest says is still missing, and nothing twice.

Run it on a login node (or a laptop): each stage is submitted through submitit, the driver
waits for the stage's jobs, merges their outputs, and moves on. Stages already `done` are
skipped without importing torch, so re-running a finished iteration takes about a second.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import submitit

from distill import pipeline
from distill.config import RunConfig, check_paths, load_config
from distill.errors import DistillError
from distill.manifest import Manifest, format_table
from jobs import stages
from jobs.executors import local_threads, make_executor, resolve_kind


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wait(jobs: Sequence[submitit.Job], stage: str) -> list[Any]:
    """Block until every job ends; a failure becomes one line pointing at the job's log."""
    results = []
    for job in jobs:
        try:
            results.append(job.result())
        except Exception as exc:
            first = str(exc).strip().splitlines()
            last = first[-1] if first else type(exc).__name__
            raise DistillError(f"{stage}: job {job.job_id} failed: {last} (log: {job.paths.stderr})") from None
    return results


class Driver:
    def __init__(self, cfg: RunConfig, executor: str | None = None) -> None:
        self.cfg = cfg
        self.kind = resolve_kind(executor)
        self.paths, self.manifest = pipeline.open_run(cfg)

    def executor(self, stage: str) -> submitit.AutoExecutor:
        return make_executor(self.kind, self.paths.logs, name=f"distill-{self.cfg.name}-{stage}")

    def threads(self, parallel_jobs: int) -> int | None:
        return local_threads(parallel_jobs) if self.kind in ("local", "debug") else None

    def submit(self, stage: str, fn: Any, arg_lists: list[tuple], keys: list[str]) -> list[Any]:
        """Submit one job per argument tuple (an array when several) and wait for all of them."""
        if not arg_lists:
            return []
        ex = self.executor(stage)
        with ex.batch():
            jobs = [ex.submit(fn, *args) for args in arg_lists]
        self.manifest.add_job_ids(self.iteration, stage, {k: j.job_id for k, j in zip(keys, jobs, strict=True)})
        say(f"  submitted {len(jobs)} job(s): {', '.join(j.job_id for j in jobs)}")
        return wait(jobs, stage)

    def pending_shards(self, stage: str, keys: list[str]) -> list[str]:
        shards = self.manifest.stage(self.iteration, stage).get("shards", {})
        return [k for k in keys if shards.get(k, {}).get("state") != "done"]

    # -- stages --------------------------------------------------------------------------------

    def generate(self) -> None:
        num = self.cfg.generation.num_shards
        todo = self.pending_shards("generate", [str(s) for s in range(num)])
        threads = self.threads(len(todo))
        self.submit("generate", stages.GenerateShard(), [(self.cfg, self.iteration, int(s), threads) for s in todo], todo)
        n = pipeline.merge_generation(self.cfg, self.iteration)
        say(f"  merged {n} records from {num} shard(s)")

    def verify(self) -> None:
        self.submit("verify", stages.Verify(), [(self.cfg, self.iteration, self.threads(1))], ["0"])

    def train(self) -> None:
        (result,) = self.submit("train", stages.Train(), [(self.cfg, self.iteration, self.threads(1))], ["0"])
        if not result["finished"]:
            raise DistillError(f"train: stopped at step {result['step']} before the end; run again to resume")

    def evaluate(self) -> None:
        units = pipeline.eval_units(self.cfg, self.iteration)
        keys = [f"{label}:{shard}" for label, shard in units]
        todo = set(self.pending_shards("evaluate", keys))
        args = [(self.cfg, self.iteration, label, shard) for (label, shard), k in zip(units, keys, strict=True) if k in todo]
        threads = self.threads(len(args))
        self.submit("evaluate", stages.EvaluateShard(), [(*a, threads) for a in args], [f"{a[2]}:{a[3]}" for a in args])
        for label, m in pipeline.merge_evaluation(self.cfg, self.iteration).items():
            say(f"  {label}: accuracy {m['accuracy']:.3f} on {m['n']} problems, {m['tokens_mean']:.1f} tokens/answer")

    # -- the iteration -------------------------------------------------------------------------

    def run_iteration(self, iteration: int) -> None:
        self.iteration = iteration
        if iteration != 0:
            raise DistillError(f"iteration {iteration}: only iteration 0 has stages in this version")
        for stage in pipeline.ITER0_STAGES:
            if self.manifest.is_done(iteration, stage):
                say(f"iter {iteration} {stage}: done, skipped")
                continue
            say(f"iter {iteration} {stage}: running ({self.kind} executor)")
            try:
                getattr(self, stage)()
            except DistillError as exc:
                self.manifest.mark(iteration, stage, "failed", error=str(exc)[:300])
                raise
        say(f"iter {iteration}: all stages done ({self.paths.root})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.driver",
        description="Run the stages of one distillation iteration that the run's manifest lacks.",
    )
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("--iter", type=int, default=0, dest="iteration", help="iteration number (default: 0)")
    parser.add_argument("--run", help="run name: results go to <run_root>/<name> (default: the config's name)")
    parser.add_argument("--executor", choices=["auto", "slurm", "local", "debug"],
                        help="where jobs run; auto = SLURM when sbatch exists (default: $EXECUTOR or auto)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    args = parser.parse_args(argv)
    try:
        overrides = list(args.set) + ([f"name={args.run}"] if args.run else [])
        cfg = load_config(args.config, overrides)
        check_paths(cfg)
        driver = Driver(cfg, args.executor)
        driver.run_iteration(args.iteration)
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(Manifest(cfg.run_dir).read()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
