"""Helpers for tests that run against the local SLURM cluster (slurm/local/up.sh).

Not a test module. Typical use::

    from slurm_cluster import require_slurm

    @pytest.fixture
    def slurm():
        require_slurm()
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

# Node states (sinfo %t, short form; a trailing flag such as '*' or '~' is stripped) in which
# the node can run or is running jobs. "comp" (completing) is included: a node stays in it for a
# moment after each job ends, so a test starting right after another one would otherwise skip.
_USABLE_NODE_STATES = {"idle", "mix", "alloc", "comp"}


def _run(cmd: list[str], timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def slurm_available() -> tuple[bool, str]:
    """(True, description) when `sinfo` answers and some node is idle, mixed, allocated (or
    completing); else (False, reason)."""
    for tool in ("sinfo", "sbatch", "scontrol", "srun"):
        if shutil.which(tool) is None:
            return False, f"SLURM not installed: `{tool}` not on PATH (run `make slurm-up`)"
    # `scontrol ping` fails at once when slurmctld is down; sinfo would retry for ~9 s.
    try:
        ping = _run(["scontrol", "ping"])
    except subprocess.TimeoutExpired:
        return False, "`scontrol ping` did not answer within 10 s (run `make slurm-up`)"
    if ping.returncode != 0 or " is UP" not in ping.stdout:
        first = (ping.stdout or ping.stderr).strip().splitlines()
        return False, f"slurmctld not reachable: {first[0] if first else 'no answer'} (run `make slurm-up`)"
    try:
        proc = _run(["sinfo", "--noheader", "--Node", "--format=%N %t"])
    except subprocess.TimeoutExpired:
        return False, "`sinfo` did not answer within 10 s (slurmctld down? run `make slurm-up`)"
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        return False, f"`sinfo` failed: {err[-1] if err else f'exit {proc.returncode}'} (run `make slurm-up`)"
    nodes = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    usable = [n for n in nodes if len(n) == 2 and n[1].rstrip("*~#!%$@^-+") in _USABLE_NODE_STATES]
    if not usable:
        seen = ", ".join(" ".join(n) for n in nodes) or "no nodes"
        return False, f"SLURM answers but no node is idle/mixed/allocated/completing ({seen})"
    return True, "SLURM up: " + ", ".join(" ".join(n) for n in usable)


def require_slurm() -> None:
    """Skip the calling test (or fixture) unless the local SLURM cluster is usable."""
    ok, reason = slurm_available()
    if not ok:
        pytest.skip(reason)


def job_state(job_id: str) -> tuple[str, str]:
    """(state, reason) of a job from squeue, e.g. ("PENDING", "BeginTime"); ("", "") once the
    job has left squeue (finished and older than MinJobAge) or is unknown."""
    proc = _run(["squeue", "--noheader", "--jobs", str(job_id), "--format=%T %r"])
    if proc.returncode != 0:
        return "", ""
    line = proc.stdout.strip().splitlines()
    if not line:
        return "", ""
    state, _, reason = line[0].partition(" ")
    return state, reason.strip()


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job --oneliner <id>` as a dict (JobState, Reason, SubmitTime, ...);
    empty when SLURM no longer knows the job."""
    proc = _run(["scontrol", "show", "job", "--oneliner", str(job_id)])
    if proc.returncode != 0 or not proc.stdout.strip():
        return {}
    first = proc.stdout.strip().splitlines()[0]
    return dict(field.split("=", 1) for field in first.split() if "=" in field)


def release_pending(job_id: str, min_age_s: float = 2.0) -> bool:
    """Let a requeued job start now instead of at its BeginTime; True when it did so.

    SLURM holds a requeued job PENDING with reason BeginTime for AuthInfo=cred_expire (+1)
    seconds, 120 by default (5 on the local cluster). This runs
    `scontrol update JobId=<id> StartTime=now` on such a job, but only once `min_age_s` has passed
    since the requeue (SubmitTime is reset to the requeue time): slurmd revoked the previous
    allocation's credential with a 1-second resolution, and a relaunch whose new credential is
    created in that same second is refused ("Job credential revoked") and the job is ENDED,
    not requeued -- its result is lost.
    """
    info = job_info(job_id)
    if info.get("JobState") != "PENDING" or info.get("Reason") != "BeginTime":
        return False
    try:
        requeued_at = time.mktime(time.strptime(info["SubmitTime"], "%Y-%m-%dT%H:%M:%S"))
    except (KeyError, ValueError):
        return False
    if time.time() < requeued_at + min_age_s:
        return False
    proc = _run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
    return proc.returncode == 0


def queue_dump() -> str:
    """Every job SLURM knows and every node's state, for failure messages."""
    jobs = _run(["squeue", "--all", "--format=%i %P %T %r %C %M %j"]).stdout.strip()
    nodes = _run(["sinfo", "--Node", "--noheader", "--format=%N %t %C"]).stdout.strip()
    return f"--- squeue\n{jobs}\n--- sinfo (node state, CPUs allocated/idle/other/total)\n{nodes}"


def wait_idle(timeout: float = 60) -> None:
    """Wait until no job is left in the queue (a cancelled job holds its CPUs while completing)."""
    try:
        wait_for(lambda: not _run(["squeue", "--noheader", "--all"]).stdout.strip(), timeout=timeout, interval=0.5)
    except TimeoutError:
        pytest.fail(f"jobs of earlier tests still queued after {timeout} s\n{queue_dump()}")


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.25) -> T:
    """Call `predicate` until it returns a truthy value and return that value; raise
    TimeoutError after `timeout` seconds (the predicate is always tried at least once)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"condition {getattr(predicate, '__name__', predicate)!r} not met in {timeout} s"
            )
        time.sleep(interval)
