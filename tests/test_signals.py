"""Stop signals on the plain `python -m jobs.sbatch` path: the stop signal twice stops and asks
for one requeue, and the run ends where an uninterrupted one does; SIGTERM stops at a safe
point and records the unit stopped, never running; Ctrl-C records it failed, in one line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.config import load_config
from distill.manifest import Manifest
from distill.training import newest_checkpoint
from tests.conftest import ROOT, run_stage_unit
from tests.test_slurm_pipeline import write_verified

SETS = ["train.max_steps=300", "train.save_steps=10", "train.batch_size=16", "train.log_steps=10"]


def start_stage(cfg: Path, run: str, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jobs.sbatch", *args, "--config", str(cfg), "--iter", "0", "--run", run,
           *[a for s in SETS for a in ("--set", s)]]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signalled(cfg: Path, runs: Path, run: str, *signums: int) -> tuple[subprocess.Popen, str]:
    """Train in `python -m jobs.sbatch`; once it has a checkpoint, send `signums` 50 ms apart;
    the ended process and its stderr."""
    proc = start_stage(cfg, run, "train")
    deadline = time.time() + 120
    while newest_checkpoint(runs / run / "iter-0" / "train" / "checkpoints") is None:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    for signum in signums:
        proc.send_signal(signum)
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    return proc, err


@pytest.fixture
def setup(tiny_world, tmp_path):
    from tests.test_driver import demo_config

    cfg = demo_config(tmp_path, tiny_world)
    for run in ("twice", "term", "whole", "ctrlc"):
        write_verified(tmp_path / "runs" / run, ROOT / "data" / "tiny" / "train.jsonl", 200)
    return cfg, tmp_path / "runs"


@pytest.mark.slow
def test_the_stop_signal_twice_requeues_once_and_the_run_ends_as_an_uninterrupted_one(setup):
    cfg, runs = setup
    proc, err = signalled(cfg, runs, "twice", signal.SIGUSR2, signal.SIGUSR2)
    assert proc.returncode == 3, err  # requeue me
    assert err.count("caught SIGUSR2: stopping at the next safe point; further stop signals are ignored") == 1
    entry = Manifest(runs / "twice").stage(0, "train")
    assert entry["state"] == "pending" and entry["requeued"] == 1, entry
    stopped_at = entry["metrics"]["step"]
    assert 0 < stopped_at < 300
    # The next allocation (a rerun here) resumes and ends where an uninterrupted run does.
    again = start_stage(cfg, "twice", "train")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    whole = run_stage_unit(load_config(cfg, [*SETS, "name=whole"]), 0, "train")
    final = json.loads(out.splitlines()[-1])
    assert final["step"] == whole["step"] == 300
    assert final["loss"] == pytest.approx(whole["loss"], abs=1e-6)
    assert Manifest(runs / "twice").stage(0, "train")["resumed_from"] == stopped_at


@pytest.mark.slow
def test_sigterm_stops_at_a_safe_point_and_never_leaves_the_unit_running(setup):
    cfg, runs = setup
    proc, err = signalled(cfg, runs, "term", signal.SIGTERM)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "train: stopped by SIGTERM at a safe point; run again to resume"
    entry = Manifest(runs / "term").stage(0, "train")
    assert entry["state"] == "pending" and "requeued" not in entry, entry
    ckpt = newest_checkpoint(runs / "term" / "iter-0" / "train" / "checkpoints")
    assert int(ckpt.name.split("-")[1]) == entry["metrics"]["step"]  # saved where it stopped


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_the_unit_is_recorded_failed(setup):
    cfg, runs = setup
    proc, err = signalled(cfg, runs, "ctrlc", signal.SIGINT, signal.SIGINT)  # pressed twice
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == "stopped; rerun the same command to resume" and "Traceback" not in err, err
    entry = Manifest(runs / "ctrlc").stage(0, "train")
    assert entry["state"] == "failed" and entry["error"] == "stopped by Ctrl-C (SIGINT); run again to resume", entry
