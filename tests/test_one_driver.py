"""One driver per run, one process per unit: a second driver refuses and submits nothing, a
unit started by hand beside a driver's job refuses, and a lease whose holder is gone is taken
over. (The same second-driver check on the SLURM cluster: tests/test_slurm_pipeline.py.)"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.errors import DistillError
from distill.lease import RunLease
from distill.manifest import Manifest
from tests.conftest import ROOT
from tests.test_driver import demo_config
from tests.test_slurm_pipeline import write_verified

SETS = ["train.max_steps=120", "train.save_steps=20", "train.batch_size=16"]


def sets(*extra: str) -> list[str]:
    return [a for s in [*SETS, *extra] for a in ("--set", s)]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.1)


@pytest.mark.slow
def test_a_second_driver_and_a_unit_started_by_hand_refuse_while_the_first_runs(tiny_world, tmp_path):
    cfg = demo_config(tmp_path, tiny_world)
    run = tmp_path / "runs" / "e2e"
    write_verified(run, ROOT / "data" / "tiny" / "train.jsonl", 200)
    driver = [sys.executable, "-m", "jobs.driver", "--config", str(cfg), "--executor", "local", "--stages", "train"]
    first = subprocess.Popen([*driver, *sets()], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: Manifest(run).stage(0, "train").get("state") == "running", first)

    second = subprocess.run([*driver, *sets()], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stdout + second.stderr
    assert second.stderr.strip() == (
        f"error: {run}: another driver works on this run (pid {first.pid} on {socket.gethostname()}, since "
        f"{json.loads((run / 'driver.lease').read_text())['started']}); wait for it to end (`make status` shows its "
        "progress) or stop it")
    assert "submitted" not in second.stdout

    by_hand = subprocess.run([sys.executable, "-m", "jobs.sbatch", "train", "--config", str(cfg),
                              "--iter", "0", *sets()],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert by_hand.returncode == 2, by_hand.stderr
    holder = Manifest(run).stage(0, "train")
    assert by_hand.stderr.strip().startswith(f"error: train is already running (pid {holder['pid']} on ")
    assert "not started twice" in by_hand.stderr

    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    assert out.count("submitted 1 job(s)") == 1
    entry = Manifest(run).stage(0, "train")
    assert entry["state"] == "done" and entry["allocations"] == 1 and entry["metrics"]["step"] == 120
    assert not (run / "driver.lease").exists()


def test_a_lease_whose_holder_is_gone_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = tmp_path / "driver.lease"
    lease.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "x",
                                 "heartbeat": 0}))
    with RunLease(tmp_path) as held:
        assert json.loads(lease.read_text())["pid"] == held.record["pid"]
        # A lease from another host is honoured while its heartbeat is fresh ...
        with pytest.raises(DistillError, match="another driver works on this run"):
            lease.write_text(json.dumps({"host": "login-2", "pid": 1, "started": "y", "heartbeat": time.time()}))
            with RunLease(tmp_path):
                pass
    # ... and taken over once it is stale.
    lease.write_text(json.dumps({"host": "login-2", "pid": 1, "started": "y", "heartbeat": time.time() - 3600}))
    with RunLease(tmp_path):
        assert json.loads(lease.read_text())["host"] == socket.gethostname()
    assert not lease.exists()


def test_the_lease_heartbeat_is_renewed(tmp_path: Path):
    with RunLease(tmp_path, heartbeat_s=0.05) as held:
        first = json.loads((tmp_path / "driver.lease").read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((tmp_path / "driver.lease").read_text())["heartbeat"] > first
        assert held.record["heartbeat"] > first
