"""The pipeline on the REAL local SLURM cluster (slurm/local/up.sh): arrays, requeues, time limits.

No mocks: the driver runs as a separate process with EXECUTOR=slurm and the `local` cluster
profile, jobs go through sbatch, signals through scancel/scontrol. Skipped cleanly when the
cluster is not up. `pytest -m slurm -rP` shows the measured figures.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from slurm_cluster import job_state, queue_dump, release_pending, require_slurm, wait_for

from distill.cost import Cost
from distill.jsonl import read_jsonl, write_jsonl
from distill.manifest import Manifest
from distill.training import newest_checkpoint
from tests.conftest import ROOT
from tests.test_driver import demo_config

pytestmark = pytest.mark.slurm

LOCAL_PROFILE = ROOT / "configs" / "cluster" / "local.yaml"


@pytest.fixture
def slurm() -> None:
    """The local test cluster (partitions debug and urgent), not some other cluster that answers."""
    require_slurm()
    out = subprocess.run(["sinfo", "--noheader", "--format=%R"], capture_output=True, text=True, check=False)
    missing = {"debug", "urgent"} - set(out.stdout.split())
    if missing:
        pytest.skip(f"not the local test cluster: partition(s) {sorted(missing)} missing (see slurm/local/)")


@pytest.fixture
def cleanup():
    """Cancel every job a test's runs recorded, and stop its drivers, whatever happened."""
    runs: list[Path] = []
    procs: list[subprocess.Popen] = []
    yield runs, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    ids = [j for run in runs for j in recorded_jobs(run)]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, check=False)


def recorded_jobs(run: Path) -> list[str]:
    data = Manifest(run).read()
    return [j for it in data.get("iterations", {}).values() for st in it.get("stages", {}).values()
            for j in st.get("job_ids", {}).values()]


def profile(tmp_path: Path, name: str = "profile", **changes) -> Path:
    raw = yaml.safe_load(LOCAL_PROFILE.read_text())
    raw.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def driver_args(cfg: Path, cluster: Path, sets: list[str], *extra: str) -> list[str]:
    args = ["--config", str(cfg), "--executor", "slurm", "--cluster", str(cluster), *extra]
    return args + [a for s in sets for a in ("--set", s)]


def start_driver(args: list[str], log: Path, procs: list[subprocess.Popen]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "jobs.driver", *args], cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
    procs.append(proc)
    return proc


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"driver still running after {timeout} s:\n{log.read_text()[-3000:]}")
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    return out


def submitted(out: str) -> int:
    """Jobs a driver submitted, from its `submitted N job(s)` lines."""
    return sum(int(line.split("submitted ")[1].split()[0]) for line in out.splitlines() if "  submitted " in line)


def lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def release_all(job_ids: list[str], released: set[str]) -> None:
    for j in job_ids:
        if release_pending(j):
            released.add(j)


# ----------------------------------------------------------------------------- the tests
@pytest.mark.slow
def test_iteration_through_sbatch_arrays_and_a_second_driver_refuses_and_submits_nothing(
        slurm, cleanup, tmp_path, tiny_world):
    runs, procs = cleanup
    cfg = demo_config(tmp_path, tiny_world)
    run = tmp_path / "runs" / "e2e"
    runs.append(run)
    sets = ["data.train_limit=60", "eval.limit=20", "train.max_steps=20", "train.save_steps=10",
            "train.batch_size=16", "generation.batch_size=32", "eval.batch_size=32", "eval.num_shards=1"]
    args = driver_args(cfg, LOCAL_PROFILE, sets)
    start = time.monotonic()
    first = start_driver(args, tmp_path / "first.log", procs)
    wait_for(lambda: Manifest(run).stage(0, "generate").get("job_ids"), timeout=60)
    # A second driver while the generation array is in flight: it refuses at once, naming the
    # first, and submits nothing.
    second = subprocess.run([sys.executable, "-m", "jobs.driver", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 2 and submitted(second.stdout) == 0, second.stdout + second.stderr
    assert f"another driver works on this run (pid {first.pid} on " in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
    out_first = finish(first, tmp_path / "first.log", timeout=600)
    elapsed = time.monotonic() - start

    stages = Manifest(run).read()["iterations"]["0"]["stages"]
    assert ({k: v["state"] for k, v in stages.items()}
            == dict.fromkeys(["generate", "verify", "train", "evaluate"], "done"))
    gen_ids = stages["generate"]["job_ids"]
    array = gen_ids["0"].split("_")[0]
    assert gen_ids == {"0": f"{array}_0", "1": f"{array}_1"}  # one array, one task per shard
    eval_ids = stages["evaluate"]["job_ids"]
    eval_array = eval_ids["teacher:0"].split("_")[0]
    assert sorted(eval_ids.values()) == [f"{eval_array}_{i}" for i in range(3)]
    assert stages["generate"]["metrics"]["records"] == 60
    assert set(stages["evaluate"]["results"]) == {"teacher", "base", "student"}
    # 2 generation tasks + verify + train + 3 evaluation tasks, each submitted exactly once.
    assert submitted(out_first) == 7, out_first
    print(f"iteration through SLURM arrays: {elapsed:.0f} s; the driver submitted {submitted(out_first)} job(s), "
          f"a second one refused: {second.stderr.strip()}")


@pytest.mark.slow
def test_requeued_array_tasks_finish_every_record_exactly_once(slurm, cleanup, tmp_path, tiny_world):
    """Task 0 is requeued by `scontrol requeue`, task 1 gets USR2 twice, the way SLURM sends it
    before a time limit and again at a preemption (submitit checkpoints and requeues it once). A requeue sends SIGTERM,
    which submitit's
    job ignores, then SIGKILL KillWait (5 s here) later: each shard is made long enough (3
    samples of 2000 problems) that the kill lands mid-shard."""
    runs, procs = cleanup
    cfg = demo_config(tmp_path, tiny_world)
    run = tmp_path / "runs" / "e2e"
    runs.append(run)
    n_problems, n_samples = 4000, 3
    n_records = n_problems * n_samples
    sets = [f"data.train_limit={n_problems}", f"generation.n={n_samples}", "generation.temperature=0.7",
            "generation.batch_size=16"]
    log = tmp_path / "driver.log"
    proc = start_driver(driver_args(cfg, LOCAL_PROFILE, sets, "--stages", "generate"), log, procs)
    shard = {s: run / "iter-0" / "generate" / f"shard-{s:05d}-of-00002.jsonl" for s in (0, 1)}
    wait_for(lambda: all(lines(p) >= 64 for p in shard.values()), timeout=120)
    ids = Manifest(run).stage(0, "generate")["job_ids"]
    at_signal = {s: lines(p) for s, p in shard.items()}
    subprocess.run(["scontrol", "requeue", ids["0"]], check=True, capture_output=True)
    for _ in range(2):
        subprocess.run(["scancel", "--signal=USR2", ids["1"]], check=True, capture_output=True)

    released: set[str] = set()
    wait_for(lambda: release_all(list(ids.values()), released) or proc.poll() is not None, timeout=240, interval=0.5)
    out = finish(proc, log, timeout=10)

    entry = Manifest(run).stage(0, "generate")
    assert entry["state"] == "done" and entry["metrics"]["records"] == n_records
    for s, path in shard.items():
        counts = Counter(r["id"] for r in read_jsonl(path))
        assert len(counts) == n_records // 2 and max(counts.values()) == 1, f"shard {s}: duplicates or gaps"
        assert entry["shards"][str(s)]["state"] == "done"
        assert entry["shards"][str(s)]["attempts"] == 2, entry["shards"][str(s)]  # ran twice, finished once
    assert entry["shards"]["1"]["requeued"] == 1  # recorded by the USR2 path, once for two signals
    assert 0 < entry["shards"]["0"]["generated_records"] < n_records // 2  # killed mid-shard
    merged = [r["id"] for r in read_jsonl(run / "iter-0" / "generations.jsonl")]
    assert len(merged) == len(set(merged)) == n_records
    assert "requeued" in out
    for s in (0, 1):
        sh = entry["shards"][str(s)]
        print(f"shard {s}: {at_signal[s]} records on disk at the signal; the resumed attempt generated "
              f"{sh['generated_records']} of {n_records // 2}; {lines(shard[s])} records in the end, none twice")


def write_verified(run: Path, data: Path, n: int) -> None:
    """A verified set made of the gold solutions, so training runs without generating first."""
    records = [{"id": f"{p['id']}#0", "problem_id": p["id"], "question": p["question"], "gold": p["answer"],
                "response": p["solution"], "correct": True, "n_tokens": 0}
               for p in read_jsonl(data)[:n]]
    write_jsonl(run / "iter-0" / "verified.jsonl", records)


def steps_lasting(seconds: float, cfg: Path, sets: list[str], tmp_path: Path) -> int:
    """Optimizer steps that take one CPU about `seconds` here, measured on a short run.

    Machines differ several-fold in speed, and a run that ends before SLURM's first USR2 tests
    nothing: with a 1-minute limit and `--signal=USR2@15` the signal comes 15 to 45 s into the
    allocation (slurmctld checks time limits every 30 s and sends the signal up to that much
    early, never late). The measured time includes loading and saving, so the rate is
    underestimated and the run lasts at least about `seconds`."""
    import torch

    from distill.config import load_config
    from tests.conftest import run_stage_unit

    probe = 100
    run_cfg = load_config(cfg, [*sets, "name=calibrate", f"train.max_steps={probe}", f"train.save_steps={probe}"])
    write_verified(run_cfg.run_dir, ROOT / "data" / "tiny" / "train.jsonl", 400)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        run_stage_unit(run_cfg, 0, "train")
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return max(300, round(seconds * probe / elapsed / 50) * 50)


@pytest.mark.slow
def test_training_spans_allocations_and_matches_an_uninterrupted_run(slurm, cleanup, tmp_path, tiny_world):
    """A 1-minute time limit: SLURM sends USR2 15 s before it, training stops after the current
    optimizer step, saves, and submitit requeues it; the next allocation resumes. An uninterrupted
    run (60-minute limit) trains alongside, one CPU each, for the reference."""
    runs, procs = cleanup
    cfg = demo_config(tmp_path, tiny_world)
    base = ["train.save_steps=50", "train.log_steps=50", "train.batch_size=32"]
    steps = steps_lasting(80, cfg, base, tmp_path)
    sets = [f"train.max_steps={steps}", *base]
    short = profile(tmp_path, "short", time_min=1, signal_delay_s=15, max_num_timeout=8)
    runs += [tmp_path / "runs" / "limited", tmp_path / "runs" / "reference"]
    for run in runs:
        write_verified(run, ROOT / "data" / "tiny" / "train.jsonl", 400)
    limited = start_driver(driver_args(cfg, short, sets, "--stages", "train", "--run", "limited"),
                           tmp_path / "limited.log", procs)
    reference = start_driver(driver_args(cfg, LOCAL_PROFILE, sets, "--stages", "train", "--run", "reference"),
                             tmp_path / "reference.log", procs)
    job = None
    released: set[str] = set()

    def finished() -> bool:
        nonlocal job
        job = job or Manifest(runs[0]).stage(0, "train").get("job_ids", {}).get("0")
        if job:
            release_all([job], released)
        return limited.poll() is not None

    wait_for(finished, timeout=480, interval=0.5)
    out = finish(limited, tmp_path / "limited.log", timeout=10)
    finish(reference, tmp_path / "reference.log", timeout=120)

    got = Manifest(runs[0]).stage(0, "train")
    ref = Manifest(runs[1]).stage(0, "train")
    assert got["state"] == ref["state"] == "done"
    assert got["allocations"] >= 2 and got["requeued"] == got["allocations"] - 1, got
    assert ref["allocations"] == 1
    # Each allocation's cost recorded once: SLURM's CPUs for its time, the requeue waits left out.
    assert [a["ended"] for a in got["spent"]] == ["pending"] * (got["allocations"] - 1) + ["done"], got["spent"]
    assert all(a["cpus"] >= 1 and a["gpus"] == 0 and 0 < a["seconds"] < 90 for a in got["spent"]), got["spent"]
    cost = Cost.of(got["spent"])
    assert cost.wall_s == pytest.approx(sum(a["seconds"] for a in got["spent"]), abs=0.01)
    assert got["metrics"]["step"] == ref["metrics"]["step"] == steps
    assert got["metrics"]["loss"] == pytest.approx(ref["metrics"]["loss"], abs=1e-6)
    stdout = (runs[0] / "logs" / job / f"{job}_0_log.out").read_text()
    assert stdout.count("this job is timed-out") == got["allocations"] - 1  # USR2 at the time limit
    print(f"training: {steps} steps, {got['allocations']} allocations, resumed at step {got.get('resumed_from')}, "
          f"final step {got['metrics']['step']} loss {got['metrics']['loss']:.6f} "
          f"(uninterrupted: {ref['metrics']['loss']:.6f}); {len(released)} early release(s)")
    assert "requeued" in out


@pytest.mark.slow
def test_status_shows_the_current_step_of_a_training_job_while_it_runs(slurm, cleanup, tmp_path, tiny_world):
    """`make status` while SLURM trains: the train row gives the job's step from its progress
    file, not only `running`; the driver's log gets the same figure every --progress-every s."""
    runs, procs = cleanup
    cfg = demo_config(tmp_path, tiny_world)
    run = tmp_path / "runs" / "e2e"
    runs.append(run)
    write_verified(run, ROOT / "data" / "tiny" / "train.jsonl", 64)
    sets = ["train.max_steps=100000", "train.save_steps=100000", "train.batch_size=8"]
    log = tmp_path / "driver.log"
    start = time.monotonic()
    start_driver(driver_args(cfg, LOCAL_PROFILE, sets, "--stages", "train", "--progress-every", "2"), log, procs)
    wait_for(lambda: Manifest(run).stage(0, "train").get("job_ids"), timeout=60)
    shown = re.compile(r" running .* step (\d+)/100000 \((\d+) s ago\)$")

    def step_in_status() -> re.Match | None:
        out = subprocess.run([sys.executable, "-m", "distill", "status", "--run", str(run)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        row = next((line for line in out.stdout.splitlines() if line.split()[1:2] == ["train"]), "")
        match = shown.search(row)
        return match if match and int(match.group(1)) > 0 else None

    match = wait_for(step_in_status, timeout=120, interval=1)
    seen_after = time.monotonic() - start
    job = Manifest(run).stage(0, "train")["job_ids"]["0"]
    assert job_state(job)[0] == "RUNNING"
    assert int(match.group(2)) < 15  # the job writes it every 5 s
    said = re.compile(r"\]   train: step (\d+)/100000 \(\d+ s ago\)")
    logged = wait_for(lambda: [int(k) for k in said.findall(log.read_text()) if int(k) > 0], timeout=30)
    assert (run / "logs" / job / f"{job}_0_log.err").is_file()  # where the README says a job's log is
    print(f"status during a SLURM training job, {seen_after:.0f} s after the driver started: "
          f"{match.group(0).split('  ')[-1]}; the driver's log: step {logged[-1]}")


# ----------------------------------------------------------------------------- plain sbatch
def sbatch(*args: str, out: Path, **env_vars: str) -> str:
    """Submit one of slurm/*.sbatch from the project root, with this interpreter as $PYTHON."""
    env = {**os.environ, "PYTHON": sys.executable, **env_vars}
    proc = subprocess.run(["sbatch", "--parsable", f"--output={out}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def config_file(tmp_path: Path, tiny_world, name: str, **values) -> Path:
    """The demo config with `values` set (dotted keys), for scripts that take only a config."""
    raw = yaml.safe_load(demo_config(tmp_path, tiny_world).read_text())
    raw["name"] = name
    for key, value in values.items():
        section, _, leaf = key.partition("__")
        raw[section][leaf] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow
def test_sbatch_scripts_requeue_generation_and_merge_after_the_array(slurm, cleanup, tmp_path, tiny_world):
    """slurm/unit.sbatch generate as an array, task 0 requeued by `scontrol requeue`, task 1 sent USR2
    the way `--signal=B:USR2@90` sends it (to the batch shell); merge.sbatch waits on afterok."""
    runs, _ = cleanup
    n_records = 3200
    cfg = config_file(tmp_path, tiny_world, "plain", data__train_limit=n_records, generation__batch_size=16)
    run = tmp_path / "runs" / "plain"
    runs.append(run)
    array = sbatch("--array=0-1", "--time=10", "slurm/unit.sbatch", "generate", str(cfg), "0",
                   out=tmp_path / "gen-%A_%a.out")
    tasks = [f"{array}_0", f"{array}_1"]
    merge = sbatch(f"--dependency=afterok:{array}", "slurm/merge.sbatch", str(cfg), "0", "generate",
                   out=tmp_path / "merge-%j.out")
    shard = {s: run / "iter-0" / "generate" / f"shard-{s:05d}-of-00002.jsonl" for s in (0, 1)}
    try:
        wait_for(lambda: all(lines(p) >= 64 for p in shard.values()), timeout=120)
        subprocess.run(["scontrol", "requeue", tasks[0]], check=True, capture_output=True)
        subprocess.run(["scancel", "--batch", "--signal=USR2", tasks[1]], check=True, capture_output=True)
        released: set[str] = set()
        wait_for(lambda: release_all(tasks, released) or Manifest(run).is_done(0, "generate"),
                 timeout=240, interval=0.5)
        wait_for(lambda: job_state(merge)[0] in ("", "COMPLETED"), timeout=30)
    except TimeoutError as exc:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("*.out")))
        pytest.fail(f"{exc}\n{logs}\n{queue_dump()}")
    finally:
        subprocess.run(["scancel", *tasks, merge], capture_output=True, check=False)
    entry = Manifest(run).stage(0, "generate")
    for s, path in shard.items():
        counts = Counter(r["id"] for r in read_jsonl(path))
        assert len(counts) == n_records // 2 and max(counts.values()) == 1, f"shard {s}: duplicates or gaps"
        assert entry["shards"][str(s)]["attempts"] == 2, (entry["shards"][str(s)],
                                                          (tmp_path / f"gen-{array}_{s}.out").read_text())
    assert entry["shards"]["1"]["requeued"] == 1
    log1 = (tmp_path / f"gen-{array}_1.out").read_text()
    assert "USR2 received" in log1 and f"requeueing {tasks[1]}" in log1, log1
    assert entry["metrics"]["records"] == n_records
    print(f"plain sbatch generation: shard 1 resumed with {n_records // 2 - entry['shards']['1']['generated_records']} "
          f"records on disk, shard 0 with {n_records // 2 - entry['shards']['0']['generated_records']}")


@pytest.mark.slow
def test_sbatch_training_requeues_itself_at_the_time_limit(slurm, cleanup, tmp_path, tiny_world):
    """slurm/unit.sbatch train with a 1-minute limit and `--signal=B:USR2@15`: the trap forwards USR2,
    training stops after the current step and saves, the script requeues the job; the result
    matches an uninterrupted run."""
    runs, _ = cleanup
    steps = steps_lasting(80, demo_config(tmp_path, tiny_world), ["train.batch_size=32"], tmp_path)
    values = {"train__max_steps": steps, "train__save_steps": 50, "train__log_steps": 50, "train__batch_size": 32}
    cfgs = {name: config_file(tmp_path, tiny_world, name, **values) for name in ("limited", "reference")}
    for name in cfgs:
        runs.append(tmp_path / "runs" / name)
        write_verified(runs[-1], ROOT / "data" / "tiny" / "train.jsonl", 400)
    # 15-45 s allocations for an 80 s run: up to 6 of them.
    limited = sbatch("--time=1", "--signal=B:USR2@15", "slurm/unit.sbatch", "train", str(cfgs["limited"]), "0",
                     out=tmp_path / "limited.out", DISTILL_MAX_REQUEUES="8")
    reference = sbatch("--time=10", "slurm/unit.sbatch", "train", str(cfgs["reference"]), "0",
                       out=tmp_path / "reference.out")
    released: set[str] = set()
    try:
        wait_for(lambda: release_all([limited], released)
                 or all(Manifest(r).stage(0, "train").get("state") in ("done", "failed") for r in runs),
                 timeout=480, interval=0.5)
    finally:
        subprocess.run(["scancel", limited, reference], capture_output=True, check=False)
    got, ref = (Manifest(r).stage(0, "train") for r in runs)
    log = (tmp_path / "limited.out").read_text()
    assert got["state"] == ref["state"] == "done", log
    assert got["requeued"] >= 1 and log.count("requeueing") == got["requeued"], log
    assert log.count("restart ") == got["requeued"] + 1  # one start line per allocation
    assert got["metrics"]["step"] == ref["metrics"]["step"] == steps
    assert got["metrics"]["loss"] == pytest.approx(ref["metrics"]["loss"], abs=1e-6)
    print(f"plain sbatch training: {steps} steps, {got['requeued'] + 1} allocations, "
          f"final loss {got['metrics']['loss']:.6f} "
          f"(uninterrupted {ref['metrics']['loss']:.6f})")


@pytest.mark.slow
def test_training_out_of_timeouts_fails_clearly_instead_of_looping(slurm, cleanup, tmp_path, tiny_world):
    """max_num_timeout=0: the first USR2 (a timeout, with a 1-minute limit) is one too many."""
    runs, procs = cleanup
    cfg = demo_config(tmp_path, tiny_world)
    run = tmp_path / "runs" / "limited"
    runs.append(run)
    write_verified(run, ROOT / "data" / "tiny" / "train.jsonl", 400)
    sets = ["train.max_steps=2000", "train.save_steps=20", "train.batch_size=32"]
    short = profile(tmp_path, "short", time_min=1, signal_delay_s=15, max_num_timeout=0)
    log = tmp_path / "driver.log"
    proc = start_driver(driver_args(cfg, short, sets, "--stages", "train", "--run", "limited"), log, procs)
    wait_for(lambda: newest_checkpoint(run / "iter-0" / "train" / "checkpoints"), timeout=120)
    job = Manifest(run).stage(0, "train")["job_ids"]["0"]
    subprocess.run(["scancel", "--signal=USR2", job], check=True, capture_output=True)
    proc.wait(timeout=120)
    out = log.read_text()
    assert proc.returncode == 2, out
    error = next(line for line in out.splitlines() if line.startswith("error: "))
    assert f"error: train: job {job} failed: " in error and "max_num_timeout" in error, out
    entry = Manifest(run).stage(0, "train")
    assert entry["state"] == "failed" and "max_num_timeout" in entry["error"], entry
    assert entry["allocations"] == 1 and "requeued" not in entry
    kept = newest_checkpoint(run / "iter-0" / "train" / "checkpoints")
    assert kept is not None and int(kept.name.split("-")[1]) == entry["metrics"]["step"] < 2000
