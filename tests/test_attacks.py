"""The promises of "Resuming and safety" under attack, each through the launcher where it broke:
data edited between iterations, a second driver after a lease takeover (another host, made with
`unshare -u`), a finished shard that loses a line, an iteration started by plain sbatch before
its previous one finished, and a verify that kept nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.manifest import Manifest
from jobs.driver import main as driver_main
from jobs.sbatch import main as stage_main
from tests.conftest import ROOT
from tests.test_driver import demo_config
from tests.test_one_driver import sets, wait_for
from tests.test_slurm_pipeline import write_verified


def world_copy(tiny_world, tmp_path: Path) -> Path:
    """A config whose data files are this test's own copies, free to edit."""
    data = tmp_path / "data"
    shutil.copytree(tiny_world.data, data)
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    cfg.write_text(cfg.read_text().replace(str(tiny_world.data), str(data)))
    return cfg


def driver(*args: str) -> list[str]:
    return ["--executor", "local", "--progress-every", "3600", *args]


def test_a_data_file_edited_after_the_run_started_is_refused_until_accepted(tiny_world, tmp_path, capsys):
    cfg = world_copy(tiny_world, tmp_path)
    run = tmp_path / "runs" / "t"
    assert driver_main(driver("--config", str(cfg), "--stages", "generate")) == 0
    recorded = Manifest(run).read()["data"]
    assert set(recorded) == {"data.train", "data.validation", "data.test"}

    test_file = tmp_path / "data" / "test.jsonl"
    rows = [json.loads(line) for line in test_file.read_text().splitlines()]
    rows[0]["solution"] = rows[0]["solution"].rsplit("####", 1)[0] + "#### 99999"
    test_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()

    # The driver, and a unit started by hand, refuse before anything runs.
    assert driver_main(driver("--config", str(cfg), "--stages", "verify")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {test_file}: data.test changed since {run} started (sha256 ")
    assert "--accept-data-change" in err and err.count("\n") == 1
    assert stage_main(["verify", "--config", str(cfg), "--iter", "0"]) == 2
    assert "data.test changed" in capsys.readouterr().err
    assert "verify" not in Manifest(run).read()["iterations"]["0"]["stages"]

    # Accepted explicitly: recorded in the history, and the units pass from then on.
    assert driver_main(driver("--config", str(cfg), "--stages", "verify", "--accept-data-change")) == 0
    data = Manifest(run).read()
    assert data["history"][-1]["data_changed"]["data.test"][0] == recorded["data.test"]["sha256"]
    assert data["data"]["data.test"]["sha256"] != recorded["data.test"]["sha256"]
    assert data["iterations"]["0"]["stages"]["verify"]["state"] == "done"


def test_a_cut_training_file_is_refused_by_a_unit_started_by_hand(tiny_world, tmp_path, capsys):
    cfg = world_copy(tiny_world, tmp_path)
    assert stage_main(["generate", "--config", str(cfg), "--iter", "0", "--shard", "0"]) == 0
    train = tmp_path / "data" / "train.jsonl"
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:10]))
    capsys.readouterr()
    assert stage_main(["generate", "--config", str(cfg), "--iter", "0", "--shard", "1"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {train}: data.train changed since ")


@pytest.mark.slow
def test_after_a_lease_takeover_the_unit_runs_once_and_the_first_driver_stops(tiny_world, tmp_path):
    """Driver A is stopped while its training job runs; its lease goes stale; driver B on
    another host takes the lease over, finds the unit run by a live process and waits for it
    instead of starting it again; A, continued, finds its lease gone and stops without writing."""
    cfg = demo_config(tmp_path, tiny_world)
    run = tmp_path / "runs" / "e2e"
    write_verified(run, ROOT / "data" / "tiny" / "train.jsonl", 200)
    args = [*driver("--config", str(cfg), "--stages", "train"), *sets()]
    first = subprocess.Popen([sys.executable, "-m", "jobs.driver", *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: Manifest(run).stage(0, "train").get("state") == "running", first)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        lease = run / "driver.lease"
        lease.write_text(json.dumps({**json.loads(lease.read_text()), "heartbeat": time.time() - 3600}))
        code = f"import sys; from jobs.driver import main; sys.exit(main({args!r}))"
        second = subprocess.run(["unshare", "-u", "sh", "-c", f"hostname login-2 && exec {sys.executable} -c \"$0\"",
                                 code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "submitted" not in second.stdout
    assert "waiting for 1 unit(s) another process runs: train (pid " in second.stdout
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 2, out
    assert out.splitlines()[-1] == (f"error: {run}: this driver's lease was taken over by another driver (which has "
                                    "ended since) while this one was not renewing it; stopped without submitting or "
                                    "recording anything more")
    entry = Manifest(run).stage(0, "train")
    assert entry["state"] == "done" and entry["allocations"] == 1 and entry["metrics"]["step"] == 120


def test_a_unit_recorded_by_a_process_on_another_host_is_live_while_its_heartbeat_is(tiny_world, tmp_path, capsys):
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    run = tmp_path / "runs" / "t"
    assert stage_main(["prepare", "--config", str(cfg), "--iter", "0"]) == 0
    with Manifest(run).update() as data:
        entry = data["iterations"].setdefault("0", {"stages": {}})["stages"].setdefault("generate", {})
        entry["shards"] = {"0": {"state": "running", "host": "login-2", "pid": 4242, "job_id": "x"}}
    beat = run / "iter-0" / "progress" / "generate-0.beat"
    beat.parent.mkdir(parents=True)
    beat.write_text(f"{time.time()}\n")
    capsys.readouterr()
    assert stage_main(["generate", "--config", str(cfg), "--iter", "0", "--shard", "0"]) == 2
    assert "generate shard 0 is already running (pid 4242 on login-2" in capsys.readouterr().err
    beat.write_text(f"{time.time() - 3600}\n")
    assert stage_main(["generate", "--config", str(cfg), "--iter", "0", "--shard", "0"]) == 0


def test_a_finished_shard_that_lost_a_line_is_healed_by_a_rerun(tiny_world, tmp_path, capsys):
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    run = tmp_path / "runs" / "t"
    assert driver_main(driver("--config", str(cfg), "--stages", "generate")) == 0
    shard = run / "iter-0" / "generate" / "shard-00001-of-00002.jsonl"
    full = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(full[:-1]))
    (run / "iter-0" / "generations.jsonl").unlink()
    capsys.readouterr()

    # verify finds its input gone and sends generate back; the next run redoes only the lost line.
    assert driver_main(driver("--config", str(cfg), "--stages", "generate,verify")) == 2
    assert "is marked pending: run again to redo it" in capsys.readouterr().err
    assert driver_main(driver("--config", str(cfg), "--stages", "generate,verify")) == 0
    out = capsys.readouterr().out
    assert "1 of 12 records missing" in out and "running them again now" in out
    lines = shard.read_text().splitlines(keepends=True)
    assert len(lines) == len(full) and sorted(lines[:-1]) == sorted(full[:-1])
    ids = [json.loads(line)["id"] for line in (run / "iter-0" / "generations.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 24
    assert Manifest(run).stage(0, "verify")["state"] == "done"


def test_plain_sbatch_iteration_1_before_iteration_0_is_finished_submits_nothing(tiny_world, tmp_path):
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    prep = subprocess.run([sys.executable, "-m", "jobs.sbatch", "prepare", "--config", str(cfg), "--iter", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert prep.returncode == 2 and "ready" not in prep.stdout
    assert prep.stderr == (f"error: t: iteration 1 needs iteration 0 finished, but its generate stage is pending: "
                           f"run `slurm/iteration.sh {cfg} 0` first\n")
    chain = subprocess.run(["bash", "slurm/iteration.sh", str(cfg), "1"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert chain.returncode != 0 and chain.stdout == ""
    assert "iteration 1 needs iteration 0 finished" in chain.stderr


def test_a_verify_that_kept_nothing_stops_the_iteration_before_training_is_submitted(tiny_world, tmp_path, capsys):
    """The fixture's teacher is untrained: none of its rationales is correct."""
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    run = tmp_path / "runs" / "t"
    assert driver_main(driver("--config", str(cfg))) == 2
    captured = capsys.readouterr()
    assert captured.err == ("error: iteration 0: verify kept 0 rationales, so there is nothing to train on: none of "
                            "the teacher's 24 rationales was correct: check the teacher's answers "
                            "and the gold answers, "
                            "or raise generation.n or generation.max_new_tokens in a new run\n")
    assert captured.out.count("submitted") == 2  # generate and verify; never train
    train = Manifest(run).stage(0, "train")
    assert train["state"] == "failed" and "job_ids" not in train
    # By hand (plain sbatch) the train unit refuses the same way, as bad input.
    assert stage_main(["train", "--config", str(cfg), "--iter", "0"]) == 2
    assert "verify kept 0 rationales" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to run as another user")
def test_report_and_repair_of_a_run_this_user_cannot_write_say_so_in_one_line(tiny_world, tmp_path):
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="distill-ro-"))
    try:
        cfg = tiny_world.write_config(root / "c.yaml", root / "runs")
        assert stage_main(["prepare", "--config", str(cfg), "--iter", "0"]) == 0
        run = root / "runs" / "t"
        for p in (root, root / "runs", run):
            p.chmod(0o755)
        for command in ("report", "repair"):
            out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                                  "distill", command, "--run", str(run)], cwd=ROOT, capture_output=True, text=True,
                                 timeout=120)
            assert out.returncode == 2, out.stderr
            assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
            assert (out.stderr.startswith(f"error: {run}/")
                    and ": permission denied: this command writes there" in out.stderr)
    finally:
        shutil.rmtree(root)


def test_local_jobs_get_the_threads_of_the_free_cores_split_between_them(monkeypatch):
    from jobs import executors
    from jobs.driver import Driver

    monkeypatch.setattr(executors.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(executors.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert [executors.local_threads(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    monkeypatch.setattr(executors.os, "getloadavg", lambda: (5.6, 0.0, 0.0))  # six cores kept busy elsewhere
    assert [executors.local_threads(n) for n in (1, 2, 3)] == [2, 1, 1]
    monkeypatch.setattr(executors.os, "getloadavg", lambda: (30.0, 0.0, 0.0))
    assert executors.local_threads(1) == 1
    assert Driver.threads(type("D", (), {"kind": "local"})(), 2) == 1
    assert Driver.threads(type("D", (), {"kind": "slurm"})(), 2) is None


def test_few_verified_rationales_are_a_warning_in_the_driver_output_and_the_report(tiny_world, tmp_path, capsys):
    from distill.report import write_report

    cfg = demo_config(tmp_path, tiny_world)
    run = tmp_path / "runs" / "e2e"
    small = ["data.train_limit=6", "train.max_steps=2", "eval.limit=4", "eval.baselines=false",
             "generation.num_shards=1", "eval.num_shards=1"]
    assert driver_main(driver("--config", str(cfg), *[a for s in small for a in ("--set", s)])) == 0
    kept = Manifest(run).stage(0, "verify")["metrics"]["kept"]
    assert 0 < kept <= 6
    line = f"verify kept {kept} rationale(s), fewer than verify.min_rationales (32): the student trains on them alone"
    assert f"; warning: {line}" in capsys.readouterr().out
    report, _ = write_report(run)
    assert f"## Warnings\n\n- iteration 0, verify: {line}\n" in report.read_text()


def test_a_run_root_with_a_percent_sign_is_refused(tiny_world, tmp_path):
    from distill.config import load_config
    from distill.errors import ConfigError

    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs-%j")
    with pytest.raises(ConfigError, match=r"run_root: contains '%' .*job logs would be written outside the run"):
        load_config(cfg)


def test_more_evaluation_shards_than_problems_finish_and_merge(tiny_world, tmp_path, capsys):
    cfg = demo_config(tmp_path, tiny_world)
    run = tmp_path / "runs" / "e2e"
    small = ["data.train_limit=6", "train.max_steps=2", "eval.limit=3", "eval.num_shards=5", "eval.baselines=false",
             "generation.num_shards=1"]
    args = driver("--config", str(cfg), *[a for s in small for a in ("--set", s)])
    assert driver_main(args) == 0, capsys.readouterr().err
    entry = Manifest(run).stage(0, "evaluate")
    assert entry["state"] == "done" and entry["results"]["student"]["n"] == 3
    capsys.readouterr()
    assert driver_main(args) == 0
    assert capsys.readouterr().out.count("done, skipped") == 4


def test_a_lease_whose_heartbeat_lies_in_the_future_names_the_clock_skew(tmp_path):
    from distill.errors import DistillError
    from distill.lease import RunLease

    (tmp_path / "driver.lease").write_text(json.dumps(
        {"host": "login-2", "pid": 1, "started": "x", "heartbeat": time.time() + 3600}))
    with pytest.raises(DistillError) as refused, RunLease(tmp_path):
        pass
    assert "another driver works on this run (pid 1 on login-2" in str(refused.value)
    assert "s in the future: the clocks of login-2 and " in str(refused.value)
    assert "differ (check NTP)" in str(refused.value)
