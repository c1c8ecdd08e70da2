"""The iteration driver: does whatever the manifest says is still missing, and nothing twice.

Run it on a login node (or a laptop): each stage is submitted through submitit (shards as one
SLURM array), the driver waits for the stage's jobs, merges their outputs in-process, and moves
on. Stages already `done` are skipped without importing torch, so re-running a finished
iteration takes about a second. It can be re-run (or run twice) at any time: a shard whose
recorded job is still in squeue is waited for, not submitted again.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import submitit
from filelock import FileLock, SoftFileLock

from distill import pipeline
from distill.config import RunConfig, load_config
from distill.errors import DistillError
from distill.manifest import Manifest, format_table
from distill.preflight import check_inputs
from jobs import stages
from jobs.cluster import ClusterProfile, load_profile
from jobs.executors import attach, local_threads, make_executor, resolve_kind
from jobs.queue import in_flight, queue_states


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def failure(stage: str, job: submitit.Job, why: str) -> DistillError:
    """One line: the job's final exception line (submitit wraps the remote traceback in text
    that ends with log paths), and where its full log is."""
    trace = why.split("You can check full logs")[0]
    lines = [line.strip() for line in trace.splitlines() if line.strip().strip("-")]
    last = lines[-1] if lines else "no detail"
    return DistillError(f"{stage}: job {job.job_id} failed: {last} (log: {job.paths.stderr})")


def wait(jobs: Sequence[submitit.Job], stage: str, kind: str, *, poll_s: float = 2.0, grace_s: float = 30.0) -> None:
    """Block until every job has ended; the first failure becomes one line naming the job's log.

    A SLURM job has ended when its result pickle exists, or when it has left squeue (a requeued
    job is PENDING again, so it stays) without leaving one for `grace_s` seconds: cancelled or
    killed. Polling squeue is needed because without accounting `sacct` fails and `job.result()`
    would wait forever for such a job. Local jobs are the driver's children: it knows when they end.
    """
    if kind != "slurm":
        for job in jobs:
            try:
                job.result()
            except Exception as exc:
                raise failure(stage, job, str(exc)) from None
        return
    pending = list(jobs)
    gone_since: dict[str, float] = {}
    last_state: dict[str, str] = {}
    while pending:
        states = queue_states()
        for job in list(pending):
            if job.paths.result_pickle.exists():
                pending.remove(job)
                try:
                    job.result()
                except Exception as exc:
                    raise failure(stage, job, str(exc)) from None
            elif states is None:
                continue  # squeue did not answer: ask again, assume nothing
            elif in_flight(states, job.job_id):
                gone_since.pop(job.job_id, None)
                state, reason = states[job.job_id]
                if state == "PENDING" and last_state.get(job.job_id, "PENDING") != "PENDING":
                    say(f"  job {job.job_id} requeued ({reason})")
                last_state[job.job_id] = state
            elif time.monotonic() - gone_since.setdefault(job.job_id, time.monotonic()) > grace_s:
                state = states.get(job.job_id, ("gone from the queue", ""))[0]
                raise failure(stage, job, f"ended without a result ({state}: cancelled, killed, out of memory?)")
        if pending:
            time.sleep(poll_s)


def _stopped_at(entry: dict[str, Any]) -> str:
    m = entry.get("metrics", {})
    return f"stopped at step {m['step']} of {m['total_steps']}" if "step" in m and "total_steps" in m else ""


class Driver:
    def __init__(self, cfg: RunConfig, executor: str | None = None, cluster: ClusterProfile | None = None) -> None:
        self.cfg = cfg
        self.kind = resolve_kind(executor)
        self.cluster = cluster
        self.paths, self.manifest = pipeline.open_run(cfg)
        lock_cls = SoftFileLock if cfg.lock == "soft" else FileLock
        # Held from "what is missing and not in flight" to "job ids recorded", so two drivers of
        # one run never both submit the same shard.
        self.submit_lock = lock_cls(str(self.paths.root / "submit.lock"), timeout=600)

    def executor(self, stage: str) -> submitit.AutoExecutor:
        return make_executor(self.kind, self.paths.logs, name=f"distill-{self.cfg.name}-{stage}",
                             profile=self.cluster, stage=stage)

    def threads(self, parallel_jobs: int) -> int | None:
        return local_threads(parallel_jobs) if self.kind in ("local", "debug") else None

    def unit_state(self, stage: str, key: str, sharded: bool) -> dict[str, Any]:
        entry = self.manifest.stage(self.iteration, stage)
        return entry.get("shards", {}).get(key, {}) if sharded else entry

    def in_flight(self, stage: str, keys: list[str]) -> dict[str, str]:
        """key -> job id of the units whose recorded job is still pending, running or requeued."""
        if self.kind != "slurm" or not keys:
            return {}
        recorded = self.manifest.stage(self.iteration, stage).get("job_ids", {})
        states = queue_states()
        if states is None:
            raise DistillError(f"{stage}: squeue does not answer, so in-flight jobs cannot be told apart "
                               f"from finished ones; try again")
        return {k: recorded[k] for k in keys if k in recorded and in_flight(states, recorded[k])}

    def run_jobs(self, stage: str, fn: Any, keys: list[str], args: Callable[[str, int | None], tuple],
                 sharded: bool = True) -> None:
        """One job per unit (shard) the manifest lacks, as one array, and wait for all of them.

        A unit whose job is still in the queue (submitted by an earlier or a concurrent driver) is
        not submitted again: this driver waits for that job instead. When this returns, every
        unit is done, or a DistillError says which is not and why.
        """
        with self.submit_lock:
            todo = [k for k in keys if self.unit_state(stage, k, sharded).get("state") != "done"]
            attached = self.in_flight(stage, todo)
            new = [k for k in todo if k not in attached]
            jobs: list[submitit.Job] = []
            if new:
                threads = self.threads(len(new))
                ex = self.executor(stage)
                with ex.batch():
                    jobs = [ex.submit(fn, *args(k, threads)) for k in new]
                self.manifest.add_job_ids(self.iteration, stage, {k: j.job_id for k, j in zip(new, jobs, strict=True)})
        if jobs:
            say(f"  submitted {len(jobs)} job(s): {', '.join(j.job_id for j in jobs)}")
        if attached:
            say(f"  waiting for {len(attached)} job(s) already in flight: {', '.join(attached.values())}")
        wait(jobs + [attach(self.kind, self.paths.logs, j) for j in attached.values()], stage, self.kind)
        for k in keys:
            entry = self.unit_state(stage, k, sharded)
            if entry.get("state") != "done":
                unit = f" shard {k}" if sharded else ""
                detail = entry.get("error") or _stopped_at(entry) or f"state {entry.get('state', 'pending')}"
                raise DistillError(f"{stage}{unit}: not done after its job ended: {detail}; run again to resume")

    # -- stages --------------------------------------------------------------------------------

    def mine(self) -> None:
        self.run_jobs("mine", stages.Mine(), ["0"], lambda k, t: (self.cfg, self.iteration, t), sharded=False)
        m = self.manifest.stage(self.iteration, "mine")["metrics"]
        say(f"  student of iteration {self.iteration - 1}: {m['errors']} errors on {m['probed']} probe problems")

    def generate(self) -> None:
        num = self.cfg.generation.num_shards
        self.run_jobs("generate", stages.GenerateShard(), [str(s) for s in range(num)],
                      lambda k, t: (self.cfg, self.iteration, int(k), t))
        n = pipeline.merge_generation(self.cfg, self.iteration)
        say(f"  merged {n} records from {num} shard(s)")

    def verify(self) -> None:
        self.run_jobs("verify", stages.Verify(), ["0"], lambda k, t: (self.cfg, self.iteration, t), sharded=False)
        m = self.manifest.stage(self.iteration, "verify")["metrics"]
        say(f"  kept {m['kept']} of {m['records']} rationales; {m['problems_unsolved']} problem(s) unsolved by the teacher")

    def train(self, baseline: bool = False) -> None:
        stage = "baseline_train" if baseline else "train"
        self.run_jobs(stage, stages.Train(), ["0"], lambda k, t: (self.cfg, self.iteration, t, baseline), sharded=False)
        entry = self.manifest.stage(self.iteration, stage)
        m = entry.get("metrics", {})
        say(f"  step {m.get('step')} of {m.get('total_steps')}, loss {m.get('loss')}, "
            f"{entry.get('allocations', 1)} allocation(s)")

    def evaluate(self, stage: str = "evaluate") -> None:
        units = {f"{label}:{shard}": (label, shard) for label, shard in pipeline.eval_units(self.cfg, self.iteration, stage)}
        self.run_jobs(stage, stages.EvaluateShard(), list(units),
                      lambda k, t: (self.cfg, self.iteration, *units[k], t, stage))
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

    def run_stages(self, iteration: int, names: Sequence[str], only: Sequence[str] | None = None) -> None:
        self.iteration = iteration
        for stage in names:
            if only is not None and stage not in only:
                continue
            if self.manifest.is_done(iteration, stage):
                say(f"iter {iteration} {stage}: done, skipped")
                continue
            say(f"iter {iteration} {stage}: running ({self.kind} executor)")
            try:
                getattr(self, stage)()
            except DistillError as exc:
                self.manifest.mark(iteration, stage, "failed", error=str(exc)[:300])
                raise

    def run_iteration(self, iteration: int, only: Sequence[str] | None = None) -> bool:
        """Run what iteration `iteration` lacks (of the stages in `only`, when given); return
        whether the student improved."""
        if iteration > 0:
            self.require_finished(iteration - 1)
        self.run_stages(iteration, pipeline.stages_for(iteration), only)
        if only is not None and not all(self.manifest.is_done(iteration, s) for s in pipeline.stages_for(iteration)):
            return False
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


def _parse_stages(text: str, iteration: int) -> list[str]:
    known = pipeline.stages_for(iteration)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in known]
    if unknown:
        raise DistillError(f"--stages: unknown stage {unknown[0]!r} (iteration {iteration} has: {', '.join(known)})")
    return names


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
    parser.add_argument("--cluster", metavar="PROFILE",
                        help="SLURM settings: a YAML file, or a name in configs/cluster/ such as local or pace "
                             "(default: one CPU and 24 h per job on the default partition)")
    parser.add_argument("--stages", help="only these stages of the iteration, comma-separated (e.g. generate,verify)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    args = parser.parse_args(argv)
    try:
        overrides = list(args.set) + ([f"name={args.run}"] if args.run else [])
        cfg = load_config(args.config, overrides)
        cluster = load_profile(args.cluster) if args.cluster else None
        only = _parse_stages(args.stages, args.iteration) if args.stages else None
        check_inputs(cfg, 1 if args.undo else args.iteration)
        driver = Driver(cfg, args.executor, cluster)
        if args.undo:
            last = driver.run_undo()
            if args.with_baseline:
                driver.run_baseline(last)
        elif args.baseline:
            driver.run_baseline(args.iteration)
        else:
            driver.run_iteration(args.iteration, only)
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(Manifest(cfg.run_dir).read()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
