"""Messages that say what happened: a failed job by its exception (not its last stderr line),
a job killed without a result by its state, a stale soft lock by its holder."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from distill.errors import DistillError
from distill.manifest import Manifest
from jobs.driver import failure_line

JOB = SimpleNamespace(job_id="77_1", paths=SimpleNamespace(stderr=Path("/logs/77_1_0_log.err")))

RAISED = """Job (task=0) failed during processing with trace:
----------------------
Traceback (most recent call last):
  File "/x/submitit/core/submission.py", line 55, in process_job
    result = delayed.result()
  File "/x/distill/training.py", line 301, in train
    raise DistillError("train: loss is nan at step 7")
distill.errors.DistillError: train: loss is nan at step 7

----------------------
You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:
  - /logs/77_1_0_log.err
  - /logs/77_1_0_log.out
"""

KILLED = """Job 77_1 (task: 0) with path /logs/77_1_0_result.pkl
has not produced any output (state: OUT_OF_MEMORY)
Error stream produced:
----------------------------------------
train:  41%|████      | 164/400 [00:20<00:29,  8.12step/s, loss=1.9041]
srun: error: node12: task 0: Out Of Memory
submitit_mai"""


def test_a_failed_job_is_reported_by_the_exception_it_raised():
    assert failure_line(JOB, RAISED) == ("job 77_1 failed: distill.errors.DistillError: train: loss is nan at step 7 "
                                         "(log: /logs/77_1_0_log.err)")


def test_a_job_killed_without_a_result_is_reported_by_its_state_not_its_last_stderr_line():
    line = failure_line(JOB, KILLED)
    assert line == ("job 77_1 failed: ended without a result (state OUT_OF_MEMORY: killed, out of memory or out of "
                    "time?) (log: /logs/77_1_0_log.err)")
    assert "step/s" not in line and "submitit_mai" not in line


def test_a_stale_soft_lock_from_another_host_names_its_holder(tmp_path):
    manifest = Manifest(tmp_path, soft_lock=True, timeout=0.2)
    Path(str(manifest.path) + ".lock").write_text("4242\nlogin-7\n123\n")
    with pytest.raises(DistillError) as err:
        manifest.mark(0, "train", "running")
    assert str(err.value) == (f"{manifest.path}.lock: held by pid 4242 on login-7 for more than 0 s; if that process "
                              "is gone (a crash on another host leaves a soft lock behind), remove the file and rerun")
