"""submitit against the REAL local SLURM cluster (slurm/local/up.sh); no mocks.

Skipped cleanly when SLURM is not up. Run with `pytest -m slurm -rP` to see the measured
requeue delay.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import submitit
from slurm_cluster import job_state, queue_dump, release_pending, require_slurm, wait_for, wait_idle

pytestmark = pytest.mark.slurm

# Where this module's package root is, so that the job's Python can unpickle the functions
# below: they are pickled by reference to this module (`test_slurm_local`, or
# `tests.test_slurm_local` if tests/ ever becomes a package).
_IMPORT_ROOT = Path(__file__).resolve().parents[__name__.count(".")]


# ----------------------------------------------------------------------------- job code
def square(x: int) -> int:
    return x * x


def _append_json(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class CountingTask(submitit.helpers.Checkpointable):
    """Sums i*i for i < n_steps, one step every `step_s` seconds.

    Progress lives in `self.state` (step, acc), assigned as one tuple so that a signal handler
    never sees a half-updated state; on USR2, submitit pickles `self` (Checkpointable.checkpoint)
    and requeues the job, which resumes from the pickled state. Every start appends a line to
    `<workdir>/starts`; every step rewrites `<workdir>/progress`.
    """

    def __init__(self) -> None:
        self.state = (0, 0)

    def __call__(self, workdir: str, n_steps: int, step_s: float) -> int:
        wd = Path(workdir)
        _append_json(
            wd / "starts",
            {
                "t": time.time(),
                "job_id": os.environ.get("SLURM_JOB_ID"),
                "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                "resumed_from": self.state[0],
            },
        )
        while self.state[0] < n_steps:
            step, acc = self.state
            time.sleep(step_s)
            self.state = (step + 1, acc + step * step)
            tmp = wd / "progress.tmp"
            tmp.write_text(str(self.state[0]))
            os.replace(tmp, wd / "progress")
        return self.state[1]


# ----------------------------------------------------------------------------- helpers
@pytest.fixture
def slurm() -> None:
    """Skip unless the local test cluster (slurm/local/up.sh) is up: besides a usable node, it
    needs the `debug` and `urgent` partitions, so these tests never submit to some other cluster
    that happens to answer `sinfo`."""
    require_slurm()
    out = subprocess.run(["sinfo", "--noheader", "--format=%R"], capture_output=True, text=True, check=False)
    missing = {"debug", "urgent"} - set(out.stdout.split())
    if missing:
        pytest.skip(f"not the local test cluster: partition(s) {sorted(missing)} missing (see slurm/local/)")


def _executor(folder: Path, **params) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    defaults = {
        # > 10 min: submitit counts a USR2 as a *timeout* (not a preemption) once the job ran
        # min(0.8 * timeout, timeout - 10 min), which is <= 0 for timeout_min <= 10.
        "timeout_min": 60,
        "slurm_partition": "debug",
        "cpus_per_task": 1,
        "slurm_setup": [f"export PYTHONPATH={_IMPORT_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"],
    }
    executor.update_parameters(**{**defaults, **params})
    return executor


def _describe(job: submitit.Job) -> str:
    state, reason = job_state(job.job_id)
    return (
        f"job {job.job_id}: squeue state={state or '-'} reason={reason or '-'}\n"
        f"--- stdout\n{job.stdout() or ''}\n--- stderr\n{job.stderr() or ''}\n{queue_dump()}"
    )


def _wait_done(jobs: list[submitit.Job], timeout: float) -> None:
    """Wait for result pickles: without accounting sacct fails, so job.result() alone would block
    forever on a job that died without writing one."""
    try:
        wait_for(lambda: all(j.done() for j in jobs), timeout=timeout, interval=0.5)
    except TimeoutError:
        pytest.fail(f"jobs not done after {timeout} s\n" + "\n".join(_describe(j) for j in jobs))


def _cancel(jobs: list[submitit.Job]) -> None:
    ids = [j.job_id for j in jobs]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, check=False)


def _read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_progress(job: submitit.Job, workdir: Path, steps: int, timeout: float = 30) -> None:
    """Wait until the task runs inside the job (submitit installs its USR2 handler before calling
    it) and has done `steps` steps."""

    def progressed() -> bool:
        p = workdir / "progress"
        return p.exists() and int(p.read_text() or 0) >= steps

    try:
        wait_for(progressed, timeout=timeout, interval=0.1)
    except TimeoutError:
        pytest.fail("task did not start\n" + _describe(job))


def _wait_restart(job: submitit.Job, workdir: Path, timeout: float = 40) -> list[float]:
    """Wait for the second start of a requeued CountingTask. SLURM holds a requeued job PENDING
    (BeginTime) for AuthInfo=cred_expire + 1 s; release_pending lets it start 2 s after the
    requeue (earlier gets the relaunch killed: "credential revoked"). Returns release times."""
    released: list[float] = []

    def restarted() -> bool:
        if release_pending(job.job_id):
            released.append(time.time())
        return len(_read_lines(workdir / "starts")) >= 2

    try:
        wait_for(restarted, timeout=timeout, interval=0.2)
    except TimeoutError:
        pytest.fail("job was not restarted\n" + _describe(job))
    return released


def _check_two_allocations(job: submitit.Job, workdir: Path, n_steps: int) -> list[dict]:
    starts = _read_lines(workdir / "starts")
    assert len(starts) == 2, starts  # exactly two allocations
    first, second = starts
    assert first["job_id"] == second["job_id"] == job.job_id  # requeued, not resubmitted
    assert (first["restart_count"], second["restart_count"]) == (0, 1)
    assert first["resumed_from"] == 0
    assert 2 <= second["resumed_from"] < n_steps  # resumed from the checkpoint, not from 0
    log = job.stdout() or ""
    assert "this job is preempted" in log, log  # counted as a preemption, not a timeout
    assert "Requeued job" in log, log
    return starts


# ----------------------------------------------------------------------------- tests
def test_map_array_returns_results(slurm: None, tmp_path: Path) -> None:
    executor = _executor(tmp_path / "logs", slurm_array_parallelism=3)
    jobs = executor.map_array(square, [1, 2, 3])
    try:
        assert len(jobs) == 3
        assert all("_" in j.job_id for j in jobs)  # array tasks: <array id>_<task>
        _wait_done(jobs, timeout=40)
        assert [j.result() for j in jobs] == [1, 4, 9]
    finally:
        _cancel(jobs)


def test_usr2_checkpoints_requeues_and_resumes(slurm: None, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    n_steps, step_s = 10, 0.4
    expected = sum(i * i for i in range(n_steps))
    executor = _executor(tmp_path / "logs")
    job = executor.submit(CountingTask(), str(workdir), n_steps, step_s)
    try:
        _wait_progress(job, workdir, steps=2)

        # Deliver USR2 the way SLURM does at preemption / before a timeout: to the job steps
        # (the srun step running Python), not to the batch shell -- `--batch` would hit only the
        # bash script, which dies on USR2 without any checkpoint. (submitit's own test hook,
        # job._interrupt(), runs the same `scancel --signal` command.)
        t_signal = time.time()
        subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, capture_output=True)

        # submitit's handler checkpoints (re-pickles the callable) and runs `scontrol requeue`.
        released = _wait_restart(job, workdir)
        _wait_done([job], timeout=30)
        assert job.result() == expected
        second = _check_two_allocations(job, workdir, n_steps)[1]
        print(
            f"requeue: restarted {second['t'] - t_signal:.1f} s after USR2"
            + (f" (released from BeginTime {released[0] - t_signal:.1f} s after USR2)" if released else "")
        )
    finally:
        _cancel([job])


def _node_cpus() -> int:
    out = subprocess.run(["sinfo", "--noheader", "--format=%c"], capture_output=True, text=True, check=True)
    return max(int(x.rstrip("+")) for x in out.stdout.split())


def test_urgent_partition_preempts_debug(slurm: None, tmp_path: Path) -> None:
    """A job in `urgent` (PriorityTier=10) preempts a job in `debug`: SLURM sends it USR2
    (preempt_send_user_signal), submitit checkpoints and requeues it, and it resumes after the
    urgent job."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    n_steps, step_s = 10, 0.4
    expected = sum(i * i for i in range(n_steps))
    # The debug job takes every CPU of the node, so the urgent job can only run by preempting it.
    wait_idle()
    low = _executor(tmp_path / "logs_debug", cpus_per_task=_node_cpus())
    job = low.submit(CountingTask(), str(workdir), n_steps, step_s)
    urgent_job = None
    try:
        _wait_progress(job, workdir, steps=2)
        high = _executor(tmp_path / "logs_urgent", slurm_partition="urgent")
        t_submit = time.time()
        urgent_job = high.submit(square, 7)

        released = _wait_restart(job, workdir)
        _wait_done([urgent_job, job], timeout=30)
        assert urgent_job.result() == 49
        assert job.result() == expected
        starts = _check_two_allocations(job, workdir, n_steps)
        # The debug job needs the whole node: it can only have restarted after the urgent one.
        assert urgent_job.paths.result_pickle.stat().st_mtime <= starts[1]["t"]
        print(
            f"preemption: urgent job done {urgent_job.paths.result_pickle.stat().st_mtime - t_submit:.1f} s "
            f"after submission; debug job restarted {starts[1]['t'] - t_submit:.1f} s after it"
            + (f" (released {released[0] - t_submit:.1f} s)" if released else "")
        )
    finally:
        _cancel([job] + ([urgent_job] if urgent_job else []))
