"""The iteration driver end to end: real submitit jobs, real models, the manifest in between."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.layout import newest_checkpoint
from distill.manifest import Manifest
from jobs.driver import main as driver_main
from tests.conftest import ROOT, run_python

TINY = ROOT / "models" / "tiny"


def demo_config(tmp_path: Path, tiny_world) -> Path:
    """The committed demo teacher (it must be competent for verification to keep anything)."""
    text = (ROOT / "configs" / "tiny.yaml").read_text()
    text = text.replace("name: tiny", f"name: e2e\nrun_root: {tmp_path / 'runs'}")
    for key in ("teacher", "student", "train", "validation", "test"):
        for line in text.splitlines():
            if line.strip().startswith(f"{key}: ") and ("models/" in line or "data/" in line):
                rel = line.split(": ", 1)[1]
                text = text.replace(line, line.replace(rel, str(ROOT / rel)))
    path = tmp_path / "e2e.yaml"
    path.write_text(text)
    return path


def snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")} if root.exists() else {}


@pytest.mark.slow
def test_iteration_zero_end_to_end_then_a_noop(tmp_path, tiny_world, capsys):
    cfg = demo_config(tmp_path, tiny_world)
    sets = ["data.train_limit=60", "eval.limit=20", "train.max_steps=20", "train.save_steps=10",
            "train.batch_size=16", "generation.batch_size=32", "eval.batch_size=32"]
    args = ["--config", str(cfg), "--executor", "local"] + [a for s in sets for a in ("--set", s)]
    assert driver_main(args) == 0
    run = tmp_path / "runs" / "e2e"
    data = Manifest(run).read()
    stages = data["iterations"]["0"]["stages"]
    assert ({k: v["state"] for k, v in stages.items()}
            == dict.fromkeys(["generate", "verify", "train", "evaluate"], "done"))
    assert stages["generate"]["metrics"]["records"] == 60
    assert set(stages["generate"]["shards"]) == {"0", "1"} and len(stages["generate"]["job_ids"]) == 2
    verified = [json.loads(line) for line in (run / "iter-0" / "verified.jsonl").read_text().splitlines()]
    assert len(verified) == stages["verify"]["metrics"]["kept"] > 30
    assert all(r["correct"] and r["pred_answer"] for r in verified)
    assert stages["train"]["metrics"]["step"] == 20
    results = stages["evaluate"]["results"]
    assert set(results) == {"teacher", "base", "student"}
    graded = [json.loads(line)
              for line in (run / "iter-0" / "eval" / "teacher" / "graded.jsonl").read_text().splitlines()]
    assert results["teacher"]["n"] == len(graded) == 20
    assert results["teacher"]["correct"] == sum(r["correct"] for r in graded)
    for art in stages["verify"]["artifacts"].values():
        assert (run / art["path"]).exists() and len(art["sha256"]) == 64

    before = snapshot(run)
    # A finished iteration is answered from the manifest alone: no model library is even imported,
    # which is what makes the re-run return in a fraction of a second.
    code = (f"import sys; from jobs.driver import main; rc = main({args!r}); "
            "print('loaded:', sorted({'torch', 'transformers'} & set(sys.modules))); sys.exit(rc)")
    out = run_python(code, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("done, skipped") == 4
    assert "loaded: []" in out.stdout
    assert snapshot(run) == before, "a no-op re-run changed the run directory"


def group_alive(pgid: int) -> list[str]:
    """The command lines of the live (not zombie) processes of a process group."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_text().replace("\0", " ")
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(cmdline)
    return alive


def interrupt(proc: subprocess.Popen, *, group: bool, ckpts: Path, after: int) -> tuple[int, str, str]:
    """SIGINT once a checkpoint past step `after` exists: to the whole process group (a
    terminal's Ctrl-C reaches the driver and every job it started) or to the driver alone.
    Waits until every process of the group has ended; returns the step and the driver's
    stdout and stderr."""
    deadline = time.time() + 300
    while (ckpt := newest_checkpoint(ckpts)) is None or int(ckpt.name.split("-")[1]) <= after:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    while group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not group_alive(proc.pid)
    return int(newest_checkpoint(ckpts).name.split("-")[1]), out, err


def running_units(manifest: dict) -> list[str]:
    return [f"{it}/{name}{'/' + key if key else ''}"
            for it, entry in manifest["iterations"].items() for name, stage in entry["stages"].items()
            for key, unit in [("", stage), *stage.get("shards", {}).items()] if unit.get("state") == "running"]


@pytest.mark.slow
def test_ctrl_c_stops_the_driver_in_one_line_and_leaves_no_unit_running(tmp_path, tiny_world):
    cfg = demo_config(tmp_path, tiny_world)
    sets = ["data.train_limit=16", "eval.limit=8", "train.max_steps=100000", "train.save_steps=5",
            "train.batch_size=16", "generation.batch_size=16"]
    cmd = [sys.executable, "-m", "jobs.driver", "--config", str(cfg), "--executor", "local",
           *[a for s in sets for a in ("--set", s)]]
    run = tmp_path / "runs" / "e2e"
    ckpts = run / "iter-0" / "train" / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    step = 0
    for group in (True, False):  # Ctrl-C in a terminal; then SIGINT to the driver alone, after a rerun
        # As from a terminal: SIGINT not ignored, even where this test runs under a shell's `&`
        # (which starts background commands with SIGINT ignored, and children inherit that).
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        before = step
        step, out, err = interrupt(proc, group=group, ckpts=ckpts, after=step)
        assert proc.returncode == 130, err
        if before:  # the rerun says where training picks up
            assert f"iter 0 train: running (local executor); train resumes from step {before}\n" in out, out
        assert err == f"stopped; rerun the same command to resume (train resumes from step {step})\n", err
        manifest = Manifest(run).read()
        assert running_units(manifest) == [], manifest
        train = manifest["iterations"]["0"]["stages"]["train"]
        assert train["state"] == "failed" and "Ctrl-C" in train["error"], train
        status = subprocess.run([sys.executable, "-m", "distill", "status", "--run", str(run)], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and " running " not in status.stdout, status.stdout
