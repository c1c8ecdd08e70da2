"""Executor selection: SLURM when `sbatch` is reachable, local subprocesses otherwise."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import submitit

from distill import pipeline
from distill.doctor import BLOCKS, NOTE, OK, Check
from distill.errors import DistillError
from jobs.cluster import ClusterProfile, load_profile

Kind = Literal["auto", "slurm", "local", "debug"]


def resolve_kind(kind: str | None) -> str:
    """`auto` (default, or EXECUTOR env) becomes `slurm` when sbatch is on PATH, else `local`."""
    kind = kind or os.environ.get("EXECUTOR") or "auto"
    if kind not in ("auto", "slurm", "local", "debug"):
        raise ValueError(f"EXECUTOR must be auto, slurm, local or debug, got {kind!r}")
    if kind == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    return kind


def make_executor(
    kind: str, folder: Path, *, name: str, timeout_min: int = 24 * 60,
    profile: ClusterProfile | None = None, stage: str = "",
) -> submitit.AutoExecutor:
    """An executor whose logs go to `folder` (on a filesystem the compute nodes share).

    With SLURM, `profile` gives the sbatch settings of `stage`'s jobs; the local executors
    ignore it (they run on this machine, with `timeout_min`).
    """
    if kind == "slurm":
        profile = profile or ClusterProfile()
        executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=kind,
                                         slurm_max_num_timeout=profile.max_num_timeout)
        executor.update_parameters(name=name, **profile.executor_parameters(stage))
        return executor
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=kind)
    executor.update_parameters(name=name, timeout_min=timeout_min)
    return executor


class SubmitRefused(DistillError):
    """sbatch refused a stage's jobs: a profile value to fix, said in one line."""


# What sbatch's refusal mentions -> the profile key that causes it.
REFUSAL_KEYS = (("generic resource", "gres"), ("gres", "gres"), ("partition", "partition"),
                ("account", "account"), ("qos", "qos"), ("time limit", "time_min"), ("memory", "mem"))


def refusal_line(profile: ClusterProfile | None, stage: str, sbatch_said: str) -> str:
    """One line for a refused submission: the profile key to fix (when sbatch's words name one),
    the stage, and sbatch's own reason."""
    lines = [ln.strip() for ln in sbatch_said.splitlines() if ln.strip()]
    said = ([ln for ln in lines if ln.startswith(("sbatch: error:", "allocation failure:"))]
            or lines[-1:] or ["no reason"])
    reason = "; ".join(dict.fromkeys(re.sub(r"^(sbatch: )?(error: )?(allocation failure: )?", "", ln) for ln in said))
    profile = profile or ClusterProfile()
    where = profile.source or "the default cluster settings (give a profile with CLUSTER=/--cluster)"
    keys = [key for words, key in REFUSAL_KEYS if words in reason.lower()]
    if keys:
        key = profile.key_of(stage, keys[0])
        value = getattr(profile.resources(stage), keys[0])
        return f"{where}: {key}: sbatch refused the {stage} jobs ({keys[0]}={value}): {reason}"
    if "node configuration is not available" in reason.lower():
        r, names = profile.resources(stage), ("cpus", "mem", "gres")
        keys = ", ".join(profile.key_of(stage, n) for n in names)
        asked = ", ".join(f"{n}={getattr(r, n)}" for n in names)
        return (f"{where}: {keys}: sbatch refused the {stage} jobs ({asked}): {reason} (more than a node of "
                f"partition {r.partition or '(default)'} has?)")
    return f"{where}: sbatch refused the {stage} jobs: {reason}"


def submission_script(profile: ClusterProfile | None, stage: str, name: str, folder: Path, array: int = 1) -> str:
    """The sbatch script submitit writes for `stage`'s jobs (an array of `array` tasks when more
    than one), its logs under `folder`; nothing is submitted or created."""
    executor = make_executor("slurm", folder, name=name, profile=profile, stage=stage)._executor
    if array > 1:
        executor.parameters["map_count"] = array  # as submitit writes an array's --array line
    return executor._make_submission_file_text("true", "check")


def check_submission(profile: ClusterProfile | None, stages: Iterable[str], name: str) -> None:
    """`sbatch --test-only` on the very script submitit would submit for each stage's jobs: a
    profile value the cluster refuses (account, QOS, partition, gres, limits) fails here with
    one line, before anything is created or submitted."""
    with tempfile.TemporaryDirectory(prefix="distill-check-") as tmp:
        for stage in stages:
            script = Path(tmp) / f"{stage}.sh"
            script.write_text(submission_script(profile, stage, name, Path(tmp)))
            try:
                proc = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True,
                                      timeout=120, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise SubmitRefused(f"sbatch --test-only did not answer ({exc}); is SLURM reachable?") from None
            if proc.returncode != 0:
                raise SubmitRefused(refusal_line(profile, stage, proc.stderr + proc.stdout))


def attach(kind: str, folder: Path, job_id: str) -> submitit.Job:
    """A handle on a job an earlier driver submitted, so this driver waits for its result
    instead of submitting it again. SLURM only: local jobs are children of their driver."""
    assert kind == "slurm", kind
    return submitit.SlurmJob(folder=str(folder / "%j"), job_id=job_id)


def local_threads(parallel_jobs: int) -> int:
    """Torch threads for each of the jobs the local executor runs at once: the cores this
    process may use, less those other work keeps busy (the 1-minute load average), split
    between the jobs. A SLURM job gets its allocation's CPUs (`jobs.allocation.set_threads`);
    a local job has no allocation, and OpenMP threads on cores that are not free spin against
    the other work: two threads beside one busy core trained the demo student ~20x slower than
    one (`bench/local_threads.py`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    free = cores - round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else cores
    return max(1, max(1, free) // max(1, parallel_jobs))


@contextlib.contextmanager
def controller_stderr(kind: str, folder: Path) -> Iterator[None]:
    """Around the submission of local jobs: submitit starts one controller process per job,
    which inherits the driver's stderr and prints a traceback there when Ctrl-C reaches it.
    Inside this block the driver's stderr is `folder/controllers.err`, so the controllers get
    that file and the terminal keeps the driver's one line. The jobs' own logs are unchanged."""
    if kind != "local":
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(folder / "controllers.err", "a") as log:
            os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def slurm_checks(profile_name: str | None) -> list[Check]:
    """`distill doctor`'s SLURM lines: the commands reachable, the controller answering, and, given
    a profile, every stage's jobs accepted by `sbatch --test-only`. Without a profile, no SLURM
    is not a problem (the local executor runs the jobs)."""
    missing = BLOCKS if profile_name else NOTE
    if not shutil.which("sbatch") or not shutil.which("squeue"):
        return [Check(missing, "no sbatch/squeue on PATH: jobs run on the local executor"
                      + (" (`module load slurm`?)" if profile_name else ""))]
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30, check=False)
        said = proc.stderr.strip() if proc.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        said = str(exc)
    if said:
        return [Check(missing, f"SLURM does not answer (sinfo: {said.splitlines()[-1]})")]
    out = [Check(OK, f"SLURM answers; partitions: {' '.join(proc.stdout.split())}")]
    if profile_name:
        try:
            profile = load_profile(profile_name)
            check_submission(profile, pipeline.resource_sections(), "distill-doctor")
        except DistillError as exc:
            return out + [Check(BLOCKS, str(exc))]
        out.append(Check(OK, f"{profile.source}: sbatch --test-only accepts every stage's jobs"))
    return out
