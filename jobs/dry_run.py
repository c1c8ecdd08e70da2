"""`--dry-run`: what the driver would submit, submitting nothing and writing nothing.

It reads what a real run reads (the config against the run's, the manifest, the cluster
profile) and prints, stage by stage, the units it would run and, on SLURM, the exact `#SBATCH`
lines of each stage's job or array as submitit would write them. What a later UNDO iteration
runs depends on the iterations before it, so those are shown as the stages each one runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from distill import pipeline
from distill.config import RunConfig
from distill.errors import DistillError
from distill.layout import RunPaths
from distill.manifest import Manifest
from distill.runner import check_run, unit_entry
from distill.stage import Stage
from jobs.cluster import ClusterProfile, load_profile
from jobs.executors import submission_script
from jobs.launch import RankLayout


class Driver(Protocol):
    """What a dry run reads of `jobs.driver.Driver`."""

    cfg: RunConfig
    kind: str
    cluster: ClusterProfile | None
    manifest: Manifest
    paths: RunPaths
    accept_data: bool

    def ranks(self, stage: Stage) -> RankLayout | None: ...

    def require_finished(self, iteration: int) -> None: ...

# An iteration, its stages, how it is shown, and whether that iteration is known (False: a later
# UNDO iteration or the baseline after the loop, shown by the stages each runs).
Step = tuple[int, Sequence[Stage], str, bool]


def stage_lines(driver: Driver, it: int, stage: Stage, known: bool = True) -> list[str]:
    """What running `stage` of iteration `it` would submit: nothing when it is done, else its
    units the manifest lacks and, on SLURM, its job's #SBATCH lines."""
    if known and driver.manifest.is_done(it, stage.name):
        return [f"  {stage.name}: done, skipped"]
    data = driver.manifest.read() if known else {}
    todo = [k for k in stage.units(driver.cfg, it) if unit_entry(data, it, stage, k).get("state") != "done"]
    what = f"{len(todo)} {stage.unit_name}(s) {', '.join(todo)}" if stage.sharded else "1 job"
    if driver.kind != "slurm":
        return [f"  {stage.name}: {what}, as {driver.kind} job(s) on this machine"]
    ranks = driver.ranks(stage)
    layout = f"; torchrun {ranks.tasks} task(s) x {ranks.procs} process(es)" if ranks else ""
    array = f" as one array of {len(todo)}" if len(todo) > 1 else ""
    script = submission_script(driver.cluster, stage.resource_section, f"distill-{driver.cfg.name}-{stage.name}",
                               driver.paths.logs, array=len(todo))
    sbatch = [f"      {line}" for line in script.splitlines() if line.startswith("#SBATCH")]
    return [f"  {stage.name}: {what}{array}{layout} (profile section {stage.resource_section}):", *sbatch]


def steps(driver: Driver, iteration: int, undo: bool, baseline: bool, with_baseline: bool,
          only: Sequence[str] | None) -> list[Step]:
    """The iterations and plans the command goes through."""
    if undo:
        later = (f"iterations 1, 2, ... while the student improves (undo.max_iters={driver.cfg.undo.max_iters}, "
                 f"undo.patience={driver.cfg.undo.patience})")
        out: list[Step] = [(0, pipeline.iteration_plan(0, driver.cfg), "iteration 0", True),
                           (1, pipeline.iteration_plan(1, driver.cfg), later, False)]
        last = [(1, pipeline.baseline_plan(), "then the one-shot baseline at the last iteration run", False)]
        return out + (last if with_baseline else [])
    if baseline:
        return [(iteration, pipeline.baseline_plan(), f"one-shot baseline at iteration {iteration}", True)]
    plan = [s for s in pipeline.iteration_plan(iteration, driver.cfg) if only is None or s.name in only]
    return [(iteration, plan, f"iteration {iteration}", True)]


def unfilled(profile_name: str | None) -> str:
    """The first value of the profile still to fill in, as the real run would refuse it; ""."""
    if profile_name is None:
        return ""
    try:
        load_profile(profile_name)
    except DistillError as exc:
        return str(exc)
    return ""


def dry_run(driver: Driver, plan: list[Step], needs: int | None, profile_name: str | None) -> list[str]:
    """The lines `--dry-run` prints: nothing is submitted, and nothing on disk changes."""
    check_run(driver.cfg, accept_data=driver.accept_data)
    if needs is not None:
        driver.require_finished(needs)
    where = (driver.cluster or ClusterProfile()).source or "default cluster settings"
    lines = [f"dry run of {driver.cfg.name} ({driver.paths.root}): {driver.kind} executor"
             + (f", {where}" if driver.kind == "slurm" else "") + "; nothing is submitted or written"]
    refusal = unfilled(profile_name) if driver.kind == "slurm" else ""
    if refusal:
        lines.append(f"to fill in before a real run: {refusal}")
    for it, stages, label, known in plan:
        lines.append(f"{label}:")
        for stage in stages:
            lines += stage_lines(driver, it, stage, known)
    return lines
