"""Progress of running units: bars write it to a file per unit, `status` and the driver show it."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from distill.__main__ import main as distill_main
from distill.config import load_config
from distill.layout import RunPaths
from distill.manifest import Manifest, format_table
from distill.progress import progress_bar, read_figure, reporting
from distill.runner import run_unit
from distill.stage import FIRST, Result, Stage, Unit
from tests.conftest import ROOT
from tests.test_driver import demo_config, group_alive
from tests.test_slurm_pipeline import write_verified


def figure(path: Path) -> dict:
    return json.loads(path.read_text())


def test_a_bar_writes_its_figure_at_once_then_throttled_and_at_close(tmp_path):
    path = tmp_path / "progress" / "train-0.json"
    with reporting(path):
        bar = progress_bar(total=500, initial=200, unit="step", file=io.StringIO(), report_every_s=3600)
    assert {k: figure(path)[k] for k in ("n", "total", "unit")} == {"n": 200, "total": 500, "unit": "step"}
    written = figure(path)["time"]
    assert abs(written - time.time()) < 5
    for _ in range(50):
        bar.update(1)
    assert figure(path)["n"] == 200, "written at every update, not throttled"
    bar.close()
    assert figure(path)["n"] == 250 and figure(path)["time"] >= written

    with reporting(path):
        bar = progress_bar(total=10, unit="record", file=io.StringIO(), report_every_s=0.2)
    bar.update(3)
    assert figure(path)["n"] == 0
    time.sleep(0.3)
    bar.update(1)
    assert figure(path)["n"] == 4  # the interval has passed: written again
    bar.close()


def test_a_disabled_bar_still_counts_and_reports(tmp_path):
    path = tmp_path / "p.json"
    with reporting(path):
        bar = progress_bar(total=8, unit="record", disable=True, report_every_s=0)
    bar.update(3)
    assert figure(path)["n"] == 3
    bar.update(5)
    bar.close()
    assert (figure(path)["n"], figure(path)["total"], figure(path)["unit"]) == (8, 8, "record")


def test_a_bar_outside_a_unit_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bar = progress_bar(total=3, file=io.StringIO(), report_every_s=0)
    bar.update(3)
    bar.close()
    assert list(tmp_path.iterdir()) == []


def test_a_progress_file_that_cannot_be_written_does_not_fail_the_work(tmp_path, caplog):
    blocker = tmp_path / "iter-0"
    blocker.write_text("a file where the progress folder would be")
    with reporting(blocker / "progress" / "train-0.json"):
        bar = progress_bar(total=4, unit="step", file=io.StringIO(), report_every_s=0)
    for _ in range(4):
        bar.update(1)
    bar.close()
    assert bar.n == 4
    warnings = [r for r in caplog.records if "progress not recorded" in r.getMessage()]
    assert len(warnings) == 1, "warned once, not at every write"


def counting_stage(seen: dict) -> Stage:
    def count(unit: Unit) -> Result:
        target = unit.paths.progress(unit.iteration, "count", unit.key)
        seen["stale figure at start"] = target.exists()
        bar = progress_bar(total=6, unit="record", disable=not unit.progress, report_every_s=0)
        for _ in range(6):
            bar.update(1)
            seen.setdefault("figures", []).append(read_figure(target)["n"])
        bar.close()
        return Result({"metrics": {"records": 6}})

    return Stage("count", count, plans=(FIRST,))


def test_run_unit_sends_its_bars_to_the_units_progress_file(tmp_path, tiny_world):
    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"))
    path = RunPaths(cfg.run_dir).progress(0, "count", "0")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"n": 99, "total": 100, "unit": "record", "time": 0}))  # an earlier attempt's
    seen: dict = {}
    outcome = run_unit(cfg, 0, counting_stage(seen), "0", progress=False)
    assert outcome.state == "done"
    assert seen == {"stale figure at start": False, "figures": [1, 2, 3, 4, 5, 6]}
    assert (figure(path)["n"], figure(path)["total"]) == (6, 6)


def write_figure(run: Path, stage: str, key: str, n: int, total: int, unit: str, age_s: float) -> None:
    path = RunPaths(run).progress(0, stage, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"n": n, "total": total, "unit": unit, "time": time.time() - age_s}))


def rows(table: str) -> dict[str, str]:
    return {line.split()[1]: line for line in table.splitlines()[1:]}


def test_status_shows_the_progress_of_running_units_only(tmp_path, capsys):
    m = Manifest(tmp_path)
    alive = {"host": socket.gethostname(), "pid": os.getpid()}
    m.mark(0, "verify", "done", metrics={"kept": 40})
    m.mark(0, "train", "running", **alive)
    m.add_job_ids(0, "generate", {"0": "11_0", "1": "11_1", "2": "11_2"})  # the stage: pending until merged
    m.mark_shard(0, "generate", "0", "running", **alive)
    m.mark_shard(0, "generate", "1", "running", **alive)
    m.mark_shard(0, "generate", "2", "done")
    m.mark(0, "mine", "running", **alive)
    m.mark(0, "evaluate", "running", **alive)  # no figure yet (loading its model)
    write_figure(tmp_path, "verify", "0", 40, 40, "answer", age_s=100)
    write_figure(tmp_path, "train", "0", 120, 500, "step", age_s=8.2)
    write_figure(tmp_path, "mine", "0", 1_250_000, 2_000_000, "record", age_s=300)
    write_figure(tmp_path, "generate", "0", 50, 100, "problem", age_s=5.2)
    write_figure(tmp_path, "generate", "1", 46, 100, "problem", age_s=3.2)
    write_figure(tmp_path, "generate", "2", 100, 100, "problem", age_s=60)  # done: not counted
    table = rows(format_table(m.read(), run_dir=tmp_path))
    assert table["train"].split()[2] == "running" and table["train"].endswith("step 120/500 (8 s ago)")
    assert (table["generate"].split()[2] == "running"
            and table["generate"].endswith("problem 96/200 in 2 units (5 s ago)"))
    assert "answer" not in table["verify"] and table["verify"].endswith("kept=40")
    assert table["mine"].split()[2] == "running" and table["mine"].endswith("record 1250000/2000000 (5 min ago)")
    assert table["evaluate"].split()[2] == "running" and "ago" not in table["evaluate"]
    assert "ago" not in format_table(m.read())  # without the run directory: the manifest alone

    assert distill_main(["status", "--run", str(tmp_path)]) == 0
    assert "step 120/500 (8 s ago)" in capsys.readouterr().out

    m.mark(0, "train", "done", metrics={"step": 500})
    write_figure(tmp_path, "train", "0", 500, 500, "step", age_s=1)
    assert "ago" not in rows(format_table(m.read(), run_dir=tmp_path))["train"]


def test_status_shows_no_progress_for_a_unit_whose_process_is_gone(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    here = socket.gethostname()
    m = Manifest(tmp_path)
    m.mark(0, "train", "running", host=here, pid=dead)
    m.mark_shard(0, "generate", "0", "running", host=here, pid=dead)
    m.mark_shard(0, "generate", "1", "running", host=here, pid=os.getpid())
    write_figure(tmp_path, "train", "0", 120, 500, "step", age_s=8)
    write_figure(tmp_path, "generate", "0", 10, 100, "problem", age_s=600)
    write_figure(tmp_path, "generate", "1", 20, 100, "problem", age_s=1)
    table = rows(format_table(m.read(), run_dir=tmp_path))
    assert table["train"].split()[2] == "interrupted" and "step" not in table["train"]
    assert table["generate"].split()[2] == "running" and table["generate"].endswith("problem 20/100 (1 s ago)")


def test_the_driver_logs_training_progress_while_it_waits(tmp_path, tiny_world):
    """stdout and stderr to a file, as in a batch log: a line every --progress-every seconds."""
    cfg = demo_config(tmp_path, tiny_world)
    run = tmp_path / "runs" / "e2e"
    write_verified(run, ROOT / "data" / "tiny" / "train.jsonl", 64)
    sets = ["train.max_steps=100000", "train.save_steps=100000", "train.batch_size=8"]
    log = tmp_path / "driver.log"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.driver", "--config", str(cfg), "--executor", "local",
                             "--stages", "train", "--progress-every", "1", *[a for s in sets for a in ("--set", s)]],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not any(line.startswith("step ") and not line.startswith("step 0/") for line in progress_lines(log)):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
        while group_alive(proc.pid):
            time.sleep(0.1)
    said = progress_lines(log)
    assert len(said) >= 2, log.read_text()  # one per interval, from the job's start on
    assert all(line.endswith(" s ago)") or line == "no progress reported yet" for line in said), said
    assert "\r" not in log.read_text()  # no bar drawn into a log


def progress_lines(log: Path) -> list[str]:
    """The driver's progress lines for train: `[12:00:03]   train: step 120/100000 (3 s ago)`."""
    return [line.split("  train: ", 1)[1] for line in log.read_text().splitlines() if "]   train: " in line]
