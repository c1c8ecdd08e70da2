"""What SLURM's queue says about our jobs: the driver's only source for "is it still in flight".

The manifest records which job runs which shard; squeue says whether that job is still pending,
running or requeued. Accounting (`sacct`) is not needed, so this works on clusters without it.
"""

from __future__ import annotations

import getpass
import subprocess

# Every state a job shows in squeue until it has ended for good; a requeued job is PENDING again.
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


def queue_states(user: str | None = None) -> dict[str, tuple[str, str]] | None:
    """job id (`123`, or `123_4` for an array task) -> (state, reason) for the user's jobs;
    None when squeue does not answer, so callers never mistake an outage for "finished"."""
    cmd = ["squeue", "--noheader", "--array", f"--user={user or getpass.getuser()}", "--format=%i|%T|%r"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    states = {}
    for line in proc.stdout.splitlines():
        job_id, state, reason = (line.split("|") + ["", ""])[:3]
        if job_id.strip():
            states[job_id.strip()] = (state.strip(), reason.strip())
    return states


def in_flight(states: dict[str, tuple[str, str]], job_id: str) -> bool:
    """Pending, running, requeued or finishing: anything but gone or ended."""
    entry = states.get(job_id)
    return entry is not None and entry[0] not in ENDED
