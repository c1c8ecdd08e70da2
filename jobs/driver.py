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
from distill.config import RunConfig, load_config
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

    def mine(self) -> None:
        (m,) = self.submit("mine", stages.Mine(), [(self.cfg, self.iteration, self.threads(1))], ["0"])
        say(f"  student of iteration {self.iteration - 1}: {m['errors']} errors on {m['probed']} probe problems")

    def generate(self) -> None:
        num = self.cfg.generation.num_shards
        todo = self.pending_shards("generate", [str(s) for s in range(num)])
        threads = self.threads(len(todo))
        self.submit("generate", stages.GenerateShard(), [(self.cfg, self.iteration, int(s), threads) for s in todo], todo)
        n = pipeline.merge_generation(self.cfg, self.iteration)
        say(f"  merged {n} records from {num} shard(s)")

    def verify(self) -> None:
        (m,) = self.submit("verify", stages.Verify(), [(self.cfg, self.iteration, self.threads(1))], ["0"])
        say(f"  kept {m['kept']} of {m['records']} rationales; {m['problems_unsolved']} problem(s) unsolved by the teacher")

    def train(self, baseline: bool = False) -> None:
        stage = "baseline_train" if baseline else "train"
        (result,) = self.submit(stage, stages.Train(), [(self.cfg, self.iteration, self.threads(1), baseline)], ["0"])
        if not result["finished"]:
            raise DistillError(f"{stage}: stopped at step {result['step']} before the end; run again to resume")

    def evaluate(self, stage: str = "evaluate") -> None:
        units = pipeline.eval_units(self.cfg, self.iteration, stage)
        todo = set(self.pending_shards(stage, [f"{label}:{shard}" for label, shard in units]))
        args = [(label, shard) for label, shard in units if f"{label}:{shard}" in todo]
        threads = self.threads(len(args))
        self.submit(stage, stages.EvaluateShard(), [(self.cfg, self.iteration, lb, sh, threads, stage) for lb, sh in args],
                    [f"{lb}:{sh}" for lb, sh in args])
        for label, m in pipeline.merge_evaluation(self.cfg, self.iteration, stage).items():
            say(f"  {label}: accuracy {m['accuracy']:.3f} on {m['n']} problems, {m['tokens_mean']:.1f} tokens/answer")

    def baseline_train(self) -> None:
        self.train(baseline=True)

    def baseline_evaluate(self) -> None:
        self.evaluate("baseline_evaluate")

    # -- iterations ----------------------------------------------------------------------------

    def require_finished(self, iteration: int) -> None:
        for stage in pipeline.stages_for(iteration):
            state = self.manifest.stage(iteration, stage).get("state", "pending")
            if state != "done":
                raise DistillError(
                    f"iteration {iteration + 1} needs iteration {iteration} finished, but its {stage} stage is "
                    f"{state}: run `make iter ITER={iteration}` first"
                )

    def run_stages(self, iteration: int, names: Sequence[str]) -> None:
        self.iteration = iteration
        for stage in names:
            if self.manifest.is_done(iteration, stage):
                say(f"iter {iteration} {stage}: done, skipped")
                continue
            say(f"iter {iteration} {stage}: running ({self.kind} executor)")
            try:
                getattr(self, stage)()
            except DistillError as exc:
                self.manifest.mark(iteration, stage, "failed", error=str(exc)[:300])
                raise

    def run_iteration(self, iteration: int) -> bool:
        """Run what iteration `iteration` lacks; return whether the student improved."""
        if iteration > 0:
            self.require_finished(iteration - 1)
        self.run_stages(iteration, pipeline.stages_for(iteration))
        acc = self.student_accuracy(iteration)
        if iteration == 0:
            say(f"iter 0: all stages done; student accuracy {acc:.3f} ({self.paths.root})")
            return True
        before = self.student_accuracy(iteration - 1)
        improved = acc > before
        verdict = "improved on" if improved else "did NOT improve on"
        say(f"iter {iteration}: student accuracy {acc:.3f} {verdict} iteration {iteration - 1} ({before:.3f})")
        return improved

    def student_accuracy(self, iteration: int) -> float:
        return self.manifest.stage(iteration, "evaluate")["results"]["student"]["accuracy"]

    def run_baseline(self, iteration: int) -> None:
        """One-step distillation at the same student compute as iterations 0..`iteration`."""
        self.require_finished(iteration)
        self.run_stages(iteration, pipeline.BASELINE_STAGES)

    def run_undo(self) -> int:
        """Iterations until `undo.max_iters` or `undo.patience` iterations without improvement."""
        self.run_iteration(0)
        last, misses = 0, 0
        for it in range(1, self.cfg.undo.max_iters + 1):
            last = it
            misses = 0 if self.run_iteration(it) else misses + 1
            if misses >= self.cfg.undo.patience:
                say(f"undo: stopping after iteration {it}: no improvement for {misses} iteration(s)")
                break
        return last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.driver",
        description="Run the stages of one distillation iteration that the run's manifest lacks.",
    )
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("--iter", type=int, default=0, dest="iteration", help="iteration number (default: 0)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--undo", action="store_true",
                      help="run iterations 0, 1, ... until undo.max_iters or undo.patience stops them")
    mode.add_argument("--baseline", action="store_true",
                      help="train and evaluate the one-shot student at the compute of iterations 0..ITER")
    parser.add_argument("--with-baseline", action="store_true", help="with --undo: the one-shot baseline at the end")
    parser.add_argument("--run", help="run name: results go to <run_root>/<name> (default: the config's name)")
    parser.add_argument("--executor", choices=["auto", "slurm", "local", "debug"],
                        help="where jobs run; auto = SLURM when sbatch exists (default: $EXECUTOR or auto)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    args = parser.parse_args(argv)
    try:
        overrides = list(args.set) + ([f"name={args.run}"] if args.run else [])
        cfg = load_config(args.config, overrides)
        pipeline.check_inputs(cfg, 1 if args.undo else args.iteration)
        driver = Driver(cfg, args.executor)
        if args.undo:
            last = driver.run_undo()
            if args.with_baseline:
                driver.run_baseline(last)
        elif args.baseline:
            driver.run_baseline(args.iteration)
        else:
            driver.run_iteration(args.iteration)
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(Manifest(cfg.run_dir).read()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
