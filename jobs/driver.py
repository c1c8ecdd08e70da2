"""The iteration driver: does whatever the manifest says is still missing, and nothing twice.

Run it on a login node (or a laptop): each stage of the plan (`distill.pipeline`) is submitted
through submitit, one job per unit the manifest lacks (a sharded stage as one SLURM array); the
driver waits for the stage's jobs (showing how far their units are, from the units' progress
files), merges their outputs in-process, and moves on. Stages already `done` are skipped
without importing torch, so re-running a finished iteration takes about a second. It can be
re-run at any time: a unit whose recorded job is still in squeue is waited for, not submitted
again. One driver works on a run at a time (`distill.lease`): a second one refuses, naming the
first.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import submitit
from filelock import FileLock, SoftFileLock
from tqdm import tqdm

from distill import pipeline, undo
from distill.compatibility import check_pair
from distill.config import RunConfig, load_config
from distill.errors import DistillError, NotReady
from distill.evaluation import EVALUATE
from distill.hub import local_models, record_models, resolve_models
from distill.interrupts import ignore_sigint, run_command
from distill.layout import RunPaths
from distill.lease import LeaseLost, RunLease, holding
from distill.manifest import format_table, running_figures
from distill.memory import DEFAULT_GPU_GB, PLANNED_SECTIONS, Gpu, memory_plan, misfits
from distill.preflight import check_inputs
from distill.progress import describe, fraction
from distill.runner import (
    UnitsReopened,
    check_run,
    fail_stage,
    manifest_of,
    merge_stage,
    open_run,
    record_submitted,
    short,
    unit_entry,
    unit_holder,
)
from distill.stage import Stage
from distill.student import TRAIN
from distill.typed_yaml import at_least
from jobs.cluster import ClusterProfile, load_profile, section_gpus
from jobs.dry_run import dry_run, steps
from jobs.executors import (
    SubmitRefused,
    attach,
    check_submission,
    controller_stderr,
    local_threads,
    make_executor,
    refusal_line,
    resolve_kind,
)
from jobs.launch import RankLayout, ranks_for
from jobs.queue import in_flight, queue_states
from jobs.unit_job import UnitJob


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# The line of a Python traceback that names the exception: `ValueError: ...`, `x.y.FooError`.
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b(:.*)?$")


def failure_line(job: submitit.Job, why: str) -> str:
    """One line for a job that failed, from submitit's account of it: the exception the job
    raised (the last exception line of the remote traceback), or, for a job that ended without
    a result (killed, out of memory, out of time), its final state; never the job's last stderr
    line, which is often a progress bar. Where the unit recorded its own reason in the
    manifest, the driver shows that instead."""
    trace = why.split("You can check full logs")[0]
    lines = [line.strip() for line in trace.splitlines() if line.strip().strip("-")]
    raised = [line for line in lines if EXCEPTION_LINE.match(line)]
    ended = re.search(r"has not produced any output \(state: ([^)]*)\)", why)
    if raised:
        detail = raised[-1]
    elif ended:
        detail = f"ended without a result (state {ended.group(1)}: killed, out of memory or out of time?)"
    else:
        detail = lines[0] if lines else "no detail"
    return f"job {job.job_id} failed: {short(detail)} (log: {job.paths.stderr})"


def wait(jobs: Sequence[submitit.Job], kind: str, *, poll_s: float | None = None, grace_s: float = 30.0,
         watch: Callable[[], None] = lambda: None) -> dict[str, str]:
    """Block until every job has ended, calling `watch` at each poll (every `poll_s` seconds:
    2 for SLURM, 0.5 for local jobs); returns job id -> one line for each job that failed.

    A SLURM job has ended when its result pickle exists, or when it has left squeue (a requeued
    job is PENDING again, so it stays) without leaving one for `grace_s` seconds: cancelled or
    killed. Polling squeue is needed because without accounting `sacct` fails and `job.result()`
    would wait forever for such a job. Local jobs are the driver's children: it knows when they
    end. Debug jobs run in this process when their result is asked for, so nothing is polled.
    """
    failed: dict[str, str] = {}
    poll_s = poll_s if poll_s is not None else 2.0 if kind == "slurm" else 0.5

    def collect(job: submitit.Job) -> None:
        try:
            job.result()
        except Exception as exc:
            failed[job.job_id] = failure_line(job, str(exc))

    if kind != "slurm":
        try:
            while kind == "local" and not all(job.done() for job in jobs):
                watch()
                time.sleep(poll_s)
            for job in jobs:
                collect(job)
        except KeyboardInterrupt:
            ignore_sigint()
            if kind == "local":
                stop_local(jobs)
            raise
        return failed
    pending = list(jobs)
    gone_since: dict[str, float] = {}
    last_state: dict[str, str] = {}
    while pending:
        states = queue_states()
        for job in list(pending):
            if job.paths.result_pickle.exists():
                pending.remove(job)
                collect(job)
            elif states is None:
                continue  # squeue did not answer: ask again, assume nothing
            elif in_flight(states, job.job_id):
                gone_since.pop(job.job_id, None)
                state, reason = states[job.job_id]
                if state == "PENDING" and last_state.get(job.job_id, "PENDING") != "PENDING":
                    say(f"  job {job.job_id} requeued ({reason})")
                last_state[job.job_id] = state
            elif time.monotonic() - gone_since.setdefault(job.job_id, time.monotonic()) > grace_s:
                pending.remove(job)
                state = states.get(job.job_id, ("gone from the queue", ""))[0]
                failed[job.job_id] = failure_line(
                    job, f"ended without a result ({state}: cancelled, killed, out of memory?)")
        if pending:
            watch()
            time.sleep(poll_s)
    return failed


class ProgressView:
    """How far a stage's running units are, while the driver waits for them (`distill.progress`
    has their figures): on a terminal a bar redrawn at each poll; in a log (stderr not a
    terminal) a line every `every_s` seconds among the driver's other lines, since each redraw
    of a bar there would be a line of its own."""

    def __init__(self, stage: str, figures: Callable[[], list[dict[str, Any]]], every_s: float = 60.0) -> None:
        self.stage = stage
        self.figures = figures
        self.every_s = every_s
        self.last_line = time.monotonic()
        self.bar: tqdm | None = None  # drawn from the first poll on

    def __call__(self) -> None:
        figures = self.figures()
        text = describe(figures) or "no progress reported yet"
        if sys.stderr.isatty():
            if self.bar is None:
                self.bar = tqdm(total=1000, bar_format="  {percentage:3.0f}%|{bar:24}| {desc}", file=sys.stderr,
                                leave=False)
            self.bar.n = round(1000 * fraction(figures))
            self.bar.set_description_str(f"{self.stage}: {text}")  # redraws
        elif time.monotonic() - self.last_line >= self.every_s:
            self.last_line = time.monotonic()
            say(f"  {self.stage}: {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def stop_local(jobs: Sequence[submitit.Job], timeout_s: float = 30.0) -> None:
    """Ctrl-C: local jobs are this driver's to stop. Each gets SIGINT (its unit records the
    stop) and is waited for, so the manifest is final when the driver exits; a job that has not
    ended after `timeout_s` is left to end on its own."""
    for job in jobs:
        if not job.done():
            job.cancel(check=False)
    deadline = time.monotonic() + timeout_s
    while not all(job.done() for job in jobs) and time.monotonic() < deadline:
        time.sleep(0.1)


def _stopped_at(entry: dict[str, Any]) -> str:
    m = entry.get("metrics", {})
    return f"stopped at step {m['step']} of {m['total_steps']}" if "step" in m and "total_steps" in m else ""


class Driver:
    """Runs plans of stages for one run. Nothing is written until `check` has passed, so a
    refused command leaves no run directory behind, or an unchanged one."""

    def __init__(self, cfg: RunConfig, executor: str | None = None, cluster: ClusterProfile | None = None,
                 again: str = "make iter", progress_every_s: float = 60.0, plan_check: bool = True,
                 accept_data: bool = False) -> None:
        self.cfg = cfg
        self.accept_data = accept_data  # --accept-data-change: record changed data files, do not refuse them
        self.lease: RunLease | None = None  # held while the driver works (main); re-checked before each write
        self.plan_check = plan_check  # refuse stages that `distill plan` says cannot fit (check_memory)
        self.progress_every_s = progress_every_s  # in a log: a progress line this often while jobs run
        self.kind = resolve_kind(executor)
        self.cluster = cluster
        self.again = again  # the user's command, less ITER=, for hints: `make iter CONFIG=... RUN=...`
        self.paths, self.manifest = RunPaths(cfg.run_dir), manifest_of(cfg)
        self.changes: dict[str, tuple[Any, Any]] = {}
        self.models: dict[str, dict[str, str]] = {}
        lock_cls = SoftFileLock if cfg.lock == "soft" else FileLock
        # Held from "what is missing and not in flight" to "job ids recorded", so two drivers of
        # one run never both submit the same unit.
        self.submit_lock = lock_cls(str(self.paths.submit_lock), timeout=600)
        self.iteration = 0
        self.current: Stage | None = None  # the stage being run, for the Ctrl-C line

    def check(self, needs: int | None, stages: Sequence[Stage]) -> None:
        """Everything that can refuse the command, before anything is written: the config
        against the run's (`check_run`), that iteration `needs` is finished, that SLURM accepts
        each stage's jobs (`sbatch --test-only`), and the hub models (resolved, downloaded into
        the Hugging Face cache when missing), whether teacher and student fit together
        (`distill.compatibility`)."""
        self.changes = check_run(self.cfg, accept_data=self.accept_data)
        if needs is not None:
            self.require_finished(needs)
        if self.kind == "slurm":
            sections = list(dict.fromkeys(s.resource_section for s in stages))
            check_submission(self.cluster, sections, f"distill-{self.cfg.name}-check")
        self.models = resolve_models(self.cfg, self.manifest.read().get("models", {}), say)
        if stages:  # nothing to run: a finished iteration's rerun loads no tokenizer
            for note in check_pair(self.cfg, self.models):
                say(note)
        self.check_memory(stages, teacher_eval=needs is None and EVALUATE in stages)

    def check_memory(self, stages: Sequence[Stage], teacher_eval: bool) -> None:
        """Refuse a stage whose jobs `distill plan` says cannot fit the GPUs the profile gives
        them, naming the numbers: such a job would fail with out-of-memory after its queue wait.
        Only stages given GPUs are planned; `--no-plan-check` (plan_check False) skips it, for an
        estimate that is wrong about a model."""
        if self.kind != "slurm" or not self.plan_check:
            return
        profile = self.cluster or ClusterProfile()
        gpus = section_gpus(profile, PLANNED_SECTIONS)[0]
        sections = [s for s in dict.fromkeys(st.resource_section for st in stages) if gpus.get(s)]
        if not sections:
            return
        ranks = self.ranks(TRAIN)
        world = ranks.world if ranks else 1
        assumed = {s: g or Gpu("GPU", DEFAULT_GPU_GB) for s, g in gpus.items()}
        p = memory_plan(local_models(self.cfg, self.models), assumed,
                        world_size=world, strategy=self.cfg.train.distributed if world > 1 else "none")
        for section, line in misfits(p, sections, checkpointing=self.cfg.train.gradient_checkpointing,
                                     teacher_eval=teacher_eval):
            where = f"{profile.source}: " if profile.source else ""
            raise DistillError(f"{where}{profile.key_of(section, 'gres')}: {line} (`python -m distill plan "
                               f"--config {self.cfg.source}{' --cluster ' + profile.source if profile.source else ''}`"
                               " shows the whole estimate; --no-plan-check submits anyway)")

    def open(self) -> None:
        """Create the run directory (or record the allowed config changes) and the resolved
        hub models, once `check` has passed."""
        data_before = self.manifest.read().get("data", {})
        open_run(self.cfg, record=True, accept_data=self.accept_data)
        for key, rec in self.manifest.read().get("data", {}).items():
            if key in data_before and data_before[key]["sha256"] != rec["sha256"]:
                say(f"{key}: {rec['path']} changed; accepted (--accept-data-change) "
                    "and recorded in the manifest's history")
        record_models(self.manifest, self.models)
        for key, rec in self.models.items():
            say(f"models.{key}: {rec['ref']} -> {rec['path']}")
        for key, (old, new) in self.changes.items():
            say(f"config: {key} {old!r} -> {new!r} (allowed on a started run; in the manifest's history)")

    def executor(self, stage: Stage) -> submitit.AutoExecutor:
        return make_executor(self.kind, self.paths.logs, name=f"distill-{self.cfg.name}-{stage.name}",
                             profile=self.cluster, stage=stage.resource_section)

    def ranks(self, stage: Stage) -> RankLayout | None:
        """The torchrun layout of a distributed stage's SLURM job (None: one process). Local
        executors run every unit as one process."""
        if self.kind != "slurm":
            return None
        r = (self.cluster or ClusterProfile()).resources(stage.name)
        return ranks_for(self.cfg, stage, r.nodes or 1, r.tasks_per_node or 1, r.gpus_per_node)

    def threads(self, parallel_jobs: int) -> int | None:
        return local_threads(parallel_jobs) if self.kind in ("local", "debug") else None

    def guard(self) -> None:
        """Before each submission and each record made after waiting: stop if another driver
        has taken the lease over (`RunLease.check`)."""
        if self.lease is not None:
            self.lease.check()

    def held_elsewhere(self, stage: Stage, keys: list[str]) -> dict[str, str]:
        """key -> "pid P on host H" of the units a live process outside this driver's jobs runs
        (another driver's job after a takeover, a `jobs.sbatch` started by hand): never started
        again, waited for instead."""
        data = self.manifest.read()
        holders = {k: unit_holder(data, self.paths, self.iteration, stage, k) for k in keys}
        return {k: h for k, h in holders.items() if h is not None}

    def wait_held(self, stage: Stage, held: dict[str, str], poll_s: float = 2.0) -> None:
        """Wait until no live process runs the units in `held` (their own launcher records them)."""
        view = ProgressView(stage.name, lambda: self.running_figures(stage), self.progress_every_s)
        try:
            while self.held_elsewhere(stage, list(held)):
                view()
                time.sleep(poll_s)
        finally:
            view.close()

    def unit_state(self, stage: Stage, key: str) -> dict[str, Any]:
        return unit_entry(self.manifest.read(), self.iteration, stage, key)

    def in_flight(self, stage: Stage, keys: list[str]) -> dict[str, str]:
        """key -> job id of the units whose recorded job is still pending, running or requeued.
        A unit its job recorded as failed is not: that job has given up, even while squeue still
        lists it (completing)."""
        if self.kind != "slurm" or not keys:
            return {}
        recorded = self.manifest.stage(self.iteration, stage.name).get("job_ids", {})
        states = queue_states()
        if states is None:
            raise DistillError(f"{stage.name}: squeue does not answer, so in-flight jobs cannot be told apart "
                               f"from finished ones; try again")
        return {k: recorded[k] for k in keys if k in recorded and in_flight(states, recorded[k])
                and self.unit_state(stage, k).get("state") != "failed"}

    def running_figures(self, stage: Stage) -> list[dict[str, Any]]:
        entry = self.manifest.stage(self.iteration, stage.name)
        return running_figures(self.paths.root, self.iteration, stage.name, entry)

    def run_units(self, stage: Stage) -> None:
        """One job per unit the manifest lacks (an array, for a sharded stage), and wait for all.

        A unit whose job is still in the queue (submitted by an earlier or a concurrent driver) is
        not submitted again: this driver waits for that job instead. When this returns, every
        unit is done, or a DistillError says which is not and why.
        """
        keys = stage.units(self.cfg, self.iteration)
        refusal = stage.ready(self.cfg, self.iteration, self.manifest.read())
        if refusal is not None:
            raise NotReady(refusal)
        with holding(self.submit_lock):
            self.guard()
            todo = [k for k in keys if self.unit_state(stage, k).get("state") != "done"]
            attached = self.in_flight(stage, todo)
            held = self.held_elsewhere(stage, [k for k in todo if k not in attached])
            new = [k for k in todo if k not in attached and k not in held]
            jobs: dict[str, submitit.Job] = {}
            if new:
                threads = self.threads(len(new))
                ex = self.executor(stage)
                try:
                    with controller_stderr(self.kind, self.paths.logs), ex.batch():
                        submitted = [ex.submit(UnitJob(), self.cfg, self.iteration, stage, k, threads,
                                               self.ranks(stage)) for k in new]
                except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as exc:
                    raise SubmitRefused(refusal_line(self.cluster, stage.name, str(exc))) from None
                jobs = dict(zip(new, submitted, strict=True))
                record_submitted(self.cfg, self.iteration, stage.name, {k: j.job_id for k, j in jobs.items()})
        if jobs:
            say(f"  submitted {len(jobs)} job(s): {', '.join(j.job_id for j in jobs.values())}")
        if attached:
            say(f"  waiting for {len(attached)} job(s) already in flight: {', '.join(attached.values())}")
        if held:
            say(f"  waiting for {len(held)} unit(s) another process runs: "
                + ", ".join(f"{stage.describe(k)} ({h})" for k, h in held.items()))
        jobs |= {k: attach(self.kind, self.paths.logs, j) for k, j in attached.items()}
        view = ProgressView(stage.name, lambda: self.running_figures(stage), self.progress_every_s)
        try:
            failed = wait(list(jobs.values()), self.kind, watch=view)
        finally:
            view.close()
        # A unit another process claimed between this driver's look and its job's start (a driver
        # stopped after submitting, then taken over): its job was refused; wait for the holder.
        held |= self.held_elsewhere(stage, [k for k in keys if k not in held])
        if held:
            self.wait_held(stage, held)
        self.guard()
        for key in keys:
            entry = self.unit_state(stage, key)
            if entry.get("state") == "done":
                continue
            job = jobs.get(key)
            if job is not None and job.job_id in failed:
                recorded = entry.get("error") if entry.get("state") == "failed" else None
                why = (f"job {job.job_id} failed: {recorded} (log: {job.paths.stderr})" if recorded
                       else failed[job.job_id])
                raise DistillError(f"{stage.describe(key)}: {why}")
            detail = entry.get("error") or _stopped_at(entry) or f"state {entry.get('state', 'pending')}"
            raise DistillError(f"{stage.describe(key)}: not done after its job ended: {detail}; run again to resume")

    def run_stage(self, stage: Stage) -> None:
        self.run_units(stage)
        self.guard()
        if stage.merge is not None:
            try:
                merge_stage(self.cfg, self.iteration, stage)
            except UnitsReopened as exc:
                say(f"  {short(str(exc))}; running them again now")
                self.run_units(stage)
                self.guard()
                merge_stage(self.cfg, self.iteration, stage)
        line = stage.summary(self.manifest.stage(self.iteration, stage.name))
        if line:
            say(f"  {line}")

    # -- plans ---------------------------------------------------------------------------------

    def require_finished(self, iteration: int) -> None:
        again = self.again.replace("make iter", f"make iter ITER={iteration}", 1)
        pipeline.require_finished(self.manifest.read(), self.cfg, iteration, again)

    def run_plan(self, iteration: int, stages: Sequence[Stage], only: Sequence[str] | None = None) -> None:
        self.iteration = iteration
        for stage in stages:
            if only is not None and stage.name not in only:
                continue
            if self.manifest.is_done(iteration, stage.name):
                say(f"iter {iteration} {stage.name}: done, skipped")
                continue
            resumes = stage.resume_point(self.paths, iteration)
            say(f"iter {iteration} {stage.name}: running ({self.kind} executor)" + (f"; {resumes}" if resumes else ""))
            self.current = stage
            try:
                self.run_stage(stage)
            except (SubmitRefused, LeaseLost):
                raise  # nothing was submitted, or the run is another driver's to record
            except DistillError as exc:
                fail_stage(self.cfg, iteration, stage.name, str(exc))
                raise
            except KeyboardInterrupt:
                ignore_sigint()
                if self.kind != "slurm":  # its jobs have ended (SLURM's keep running in the queue)
                    fail_stage(self.cfg, iteration, stage.name, "stopped by Ctrl-C (SIGINT); run again to resume")
                raise
            self.current = None

    def stopped_line(self) -> str:
        """What to tell the user after Ctrl-C: how to go on, and where training picks up."""
        if self.kind == "slurm":
            return "stopped; rerun the same command to resume (jobs already submitted keep running and are waited for)"
        note = self.current.resume_point(self.paths, self.iteration) if self.current else ""
        return "stopped; rerun the same command to resume" + (f" ({note})" if note else "")

    def run_iteration(self, iteration: int, only: Sequence[str] | None = None) -> bool:
        """Run what iteration `iteration` lacks (of the stages in `only`, when given); return
        whether the student improved."""
        if iteration > 0:
            self.require_finished(iteration - 1)
        plan = pipeline.iteration_plan(iteration, self.cfg)
        self.run_plan(iteration, plan, only)
        if only is not None and not all(self.manifest.is_done(iteration, s.name) for s in plan):
            return False
        result = undo.verdict(self.manifest, iteration)
        say(result.line(self.paths.root))
        return result.improved

    def run_baseline(self, iteration: int) -> None:
        """One-step distillation at the same student compute as iterations 0..`iteration`."""
        self.require_finished(iteration)
        self.run_plan(iteration, pipeline.baseline_plan())

    def run_undo(self) -> int:
        """Iterations 0, 1, ... as long as `distill.undo.next_iteration` says; the last one run."""
        self.run_iteration(0)
        last = 0
        while True:
            it, why = undo.next_iteration(self.cfg, self.manifest, last)
            if it is None:
                if why:
                    say(why)
                return last
            try:
                self.run_iteration(it)
            except NotReady as exc:
                say(f"undo: stopping before iteration {it}'s training: {exc}")
                return last
            last = it


def _parse_stages(text: str, iteration: int) -> list[str]:
    known = [s.name for s in pipeline.iteration_plan(iteration)]
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in known]
    if unknown:
        raise DistillError(f"--stages: unknown stage {unknown[0]!r} (iteration {iteration} has: {', '.join(known)})")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.driver",
        description="Run the stages of one distillation iteration that the run's manifest lacks.",
    )
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("--iter", type=at_least(0), default=0, dest="iteration", help="iteration number (default: 0)")
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
    parser.add_argument("--progress-every", type=float, default=60.0, metavar="SECONDS",
                        help="when stderr is not a terminal (a log): a progress line this often while jobs run "
                             "(default: %(default)s; on a terminal a bar shows it)")
    parser.add_argument("--accept-data-change", action="store_true",
                        help="go on although a data file differs from what the run recorded when it started "
                             "(refused otherwise); the new hashes and the change go into the manifest's history")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the stages and units it would run and, on SLURM, each job's #SBATCH lines and "
                             "array ranges; submit nothing, write nothing (make: DRY_RUN=1)")
    parser.add_argument("--no-plan-check", action="store_true",
                        help="submit stages even where `python -m distill plan` says they do not fit the profile's "
                             "GPUs (make: NO_PLAN_CHECK=1)")
    return parser


def planned(args: argparse.Namespace, driver: Driver, only: list[str] | None) -> tuple[int | None, list[Stage]]:
    """What the command will run: the iteration that must be finished first (None: none) and
    the stages whose jobs the start-up checks look at (what is done is not submitted again)."""
    if args.undo:
        stages = pipeline.iteration_plan(0, driver.cfg) + pipeline.iteration_plan(1, driver.cfg)
        return None, stages + (pipeline.baseline_plan() if args.with_baseline else [])
    if args.baseline:
        needs, stages = args.iteration, pipeline.baseline_plan()
    else:
        needs = args.iteration - 1 if args.iteration > 0 else None
        stages = [s for s in pipeline.iteration_plan(args.iteration, driver.cfg) if only is None or s.name in only]
    return needs, [s for s in stages if not driver.manifest.is_done(args.iteration, s.name)]


def run(args: argparse.Namespace, driver: Driver, only: list[str] | None) -> None:
    """The command itself, under the run's lease."""
    with RunLease(driver.paths.root, soft_lock=driver.cfg.lock == "soft") as driver.lease:
        driver.open()
        driver.manifest.check_lock()
        if args.undo:
            last = driver.run_undo()
            if args.with_baseline:
                driver.run_baseline(last)
        elif args.baseline:
            driver.run_baseline(args.iteration)
        else:
            driver.run_iteration(args.iteration, only)


def start(args: argparse.Namespace) -> tuple[Driver, list[str] | None]:
    """The driver the command line asks for, its config, profile and inputs checked, and the
    stages it was limited to (None: all)."""
    overrides = list(args.set) + ([f"name={args.run}"] if args.run is not None else [])
    cfg = load_config(args.config, overrides)
    cluster = load_profile(args.cluster, filled=not args.dry_run) if args.cluster else None
    only = _parse_stages(args.stages, args.iteration) if args.stages else None
    for note in check_inputs(cfg, 1 if args.undo else args.iteration):
        say(note)
    again = " ".join(["make iter", f"CONFIG={args.config}"] + [f"{k}={v}" for k, v in
                     (("RUN", args.run), ("CLUSTER", args.cluster), ("EXECUTOR", args.executor)) if v])
    driver = Driver(cfg, args.executor, cluster, again, args.progress_every, plan_check=not args.no_plan_check,
                    accept_data=args.accept_data_change)
    return driver, only


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    driver: Driver | None = None

    def body() -> None:
        nonlocal driver
        driver, only = start(args)
        if args.dry_run:
            plan = steps(driver, args.iteration, args.undo, args.baseline, args.with_baseline, only)
            print("\n".join(dry_run(driver, plan, planned(args, driver, only)[0], args.cluster)))
            return
        driver.check(*planned(args, driver, only))
        run(args, driver, only)
        print(format_table(driver.manifest.read(), pipeline.names()))

    return run_command(body, lambda: driver.stopped_line() if driver else "stopped; rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
