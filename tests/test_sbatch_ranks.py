"""Distributed training through plain sbatch (slurm/unit.sbatch train -> srun -> python -m jobs.sbatch
in every task -> torchrun) on the REAL local cluster: two srun tasks on its one node, each
running a one-rank torchrun, as two nodes would; no driver."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import job_info, release_pending, wait_for

from distill import pipeline
from distill.config import load_config
from distill.errors import DistillError
from distill.manifest import Manifest
from distill.training import complete_checkpoints, newest_checkpoint
from jobs.launch import RankLayout
from jobs.sbatch import ranks_of
from tests.conftest import ROOT, run_stage_unit
from tests.test_driver import demo_config
from tests.test_launch import history
from tests.test_slurm_pipeline import slurm, write_verified  # noqa: F401 (the fixture)
from tests.test_slurm_stages import sbatch_wait

DATA = ROOT / "data" / "tiny" / "train.jsonl"


def train_args(cfg: Path, run: str, sets: list[str]) -> list[str]:
    """slurm/unit.sbatch's arguments for iteration 0 of `cfg` as run `run`."""
    return ["slurm/unit.sbatch", "train", str(cfg), "0", "--run", run, *[a for s in sets for a in ("--set", s)]]


@pytest.fixture
def jobs():
    """Job ids a test submitted, cancelled whatever happened."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, check=False)


def sets_for(steps: int) -> list[str]:
    return [f"train.max_steps={steps}", "train.save_steps=50", "train.log_steps=1", "train.batch_size=16"]


@pytest.mark.slurm
@pytest.mark.slow
def test_a_ddp_config_trains_as_two_ranks_in_a_job_of_two_tasks(slurm, tmp_path, tiny_world):  # noqa: F811
    cfg = demo_config(tmp_path, tiny_world)
    sets = sets_for(60)
    run = tmp_path / "runs" / "two"
    write_verified(run, DATA, 200)
    out = tmp_path / "two.out"
    status = sbatch_wait("--ntasks=2", *train_args(cfg, "two", [*sets, "train.distributed=ddp"]), out=out)
    text = out.read_text()
    assert status == 0, text[-3000:]

    entry = Manifest(run).stage(0, "train")
    assert entry["state"] == "done" and entry["allocations"] == 1 and entry["metrics"]["step"] == 60, entry
    assert "2 task(s)" in text and text.count('"step": 60,') == 1, text[-3000:]  # task 0 alone reports
    # Each rank saved its own random state in every checkpoint: the world was two.
    for ckpt in complete_checkpoints(run / "iter-0" / "train" / "checkpoints"):
        assert sorted(p.name for p in ckpt.glob("rng*.pt")) == ["rng-1.pt", "rng.pt"], ckpt

    one = load_config(cfg, [*sets, "name=one", f"run_root={tmp_path / 'runs'}"])
    write_verified(one.run_dir, DATA, 200)
    reference = run_stage_unit(one, 0, "train")
    two, alone = history(run), history(one.run_dir)
    early = [s for s in alone if s <= 10]
    assert len(early) == 10 and all(abs(two[s] - alone[s]) <= 1e-4 * alone[s] for s in early), (two, alone)
    assert sorted(two) == sorted(alone) == list(range(1, 61))
    print(f"two ranks through sbatch: final loss {entry['metrics']['loss']:.6f} (one process: {reference['loss']:.6f})")


@pytest.mark.slurm
@pytest.mark.slow
def test_usr2_to_the_batch_shell_stops_both_ranks_at_one_step_and_the_job_requeues_and_finishes(
        slurm, jobs, tmp_path, tiny_world):  # noqa: F811
    """USR2 as `#SBATCH --signal=B:USR2@90` sends it: to the batch shell alone, whose trap passes
    it to srun, which passes it to both tasks, which pass it to their ranks. The ranks stop at
    one step and save; task 0 exits 3, the script requeues the job, and the second allocation
    resumes from that checkpoint to the last step."""
    cfg = demo_config(tmp_path, tiny_world)
    steps = 200
    run = tmp_path / "runs" / "stopped"
    write_verified(run, DATA, 200)
    out = tmp_path / "stopped.out"
    env = {**os.environ, "PYTHON": sys.executable}
    submitted = subprocess.run(["sbatch", "--parsable", "--time=10", "--ntasks=2", f"--output={out}",
                                *train_args(cfg, "stopped", [*sets_for(steps), "train.distributed=ddp"])],
                               cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    job = submitted.stdout.strip().split(";")[0]
    jobs.append(job)
    checkpoints = run / "iter-0" / "train" / "checkpoints"
    wait_for(lambda: newest_checkpoint(checkpoints) is not None or job_info(job).get("JobState") not in
             ("PENDING", "RUNNING", None), timeout=300)
    assert job_info(job).get("JobState") == "RUNNING", out.read_text()[-3000:]
    subprocess.run(["scancel", "--signal=USR2", "--batch", job], check=True)

    def ended() -> bool:
        release_pending(job)  # the requeued job starts at once rather than after cred_expire
        return job_info(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")

    wait_for(ended, timeout=600, interval=0.5)
    text = out.read_text()
    info = job_info(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text[-3000:])

    entry = Manifest(run).stage(0, "train")
    assert entry["state"] == "done" and entry["allocations"] == 2 and entry["requeued"] == 1, entry
    stopped_at = entry["resumed_from"]
    assert 0 < stopped_at < steps and entry["metrics"]["step"] == steps
    assert text.count("USR2 received") == 1 and text.count(f"requeueing {job}") == 1, text[-3000:]
    # Two tasks and two ranks, each caught it once (a rank gets it from srun and from its task).
    assert text.count("caught SIGUSR2: stopping at the next safe point") == 4, text[-3000:]
    assert "ChildFailedError" not in text  # a stop is not a failure, for torchrun either
    assert sorted(history(run)) == list(range(1, steps + 1))  # every step logged once, across allocations
    print(f"two ranks through sbatch: stopped at step {stopped_at}, {entry['allocations']} allocations, "
          f"final loss {entry['metrics']['loss']:.6f}")


@pytest.mark.slurm
def test_a_job_of_two_tasks_is_refused_in_one_line_when_training_is_not_distributed(slurm, tmp_path, tiny_world):  # noqa: F811
    cfg = demo_config(tmp_path, tiny_world)
    out = tmp_path / "none.out"
    status = sbatch_wait("--ntasks=2", *train_args(cfg, "none", [*sets_for(100), "train.distributed=none"]), out=out)
    text = out.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert status == 2 and errors == [
        "error: train: this job has 2 tasks, but train runs as one process (only training runs on several, with "
        "train.distributed: ddp or fsdp): each task would run it again; submit it with one task"], text
    assert not (tmp_path / "runs" / "none").exists()  # refused before anything was written


@pytest.mark.parametrize(("mode", "env", "expected"), [
    ("ddp", {"SLURM_STEP_NUM_TASKS": "2"}, RankLayout(2, 1)),  # two nodes, no GPU
    ("fsdp", {"SLURM_STEP_NUM_TASKS": "2", "SLURM_GPUS_ON_NODE": "4"}, RankLayout(2, 4)),
    ("ddp", {"SLURM_GPUS_ON_NODE": "4"}, RankLayout(1, 4)),  # one task (the batch script), one node's GPUs
    ("ddp", {"SLURM_GPUS_ON_NODE": "1"}, None),  # one process, as without ranks
    ("none", {"SLURM_GPUS_ON_NODE": "4"}, None),
])
def test_the_job_layout_decides_how_many_ranks_train(tmp_path, tiny_world, monkeypatch, mode, env, expected):
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"), [f"train.distributed={mode}"])
    assert ranks_of(cfg, pipeline.stage("train")) == expected


def test_a_stage_that_runs_as_one_process_refuses_several_tasks(tmp_path, tiny_world, monkeypatch):
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"), ["train.distributed=ddp"])
    with pytest.raises(DistillError, match=r"^generate: this job has 2 tasks, but generate runs as one process"):
        ranks_of(cfg, pipeline.stage("generate"))
