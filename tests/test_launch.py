"""A distributed unit on the local SLURM cluster: one job of two srun tasks, each running
torchrun with one process, the way a two-node job runs; the ranks meet on the first task's
host (c10d rendezvous), and rank 0 alone records the unit."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from slurm_cluster import wait_for

from distill import pipeline
from distill.config import load_config
from distill.manifest import Manifest
from distill.training import newest_checkpoint
from jobs.cluster import load_profile
from jobs.driver import main as driver_main
from tests.conftest import ROOT, run_stage_unit
from tests.ranks_stage import RANKS
from tests.test_driver import demo_config
from tests.test_slurm_pipeline import cleanup, driver_args, finish, slurm, start_driver, write_verified  # noqa: F401


@pytest.fixture
def ranks_stage():
    pipeline.register(RANKS, after="verify")
    yield RANKS
    pipeline.STAGES.remove(RANKS)


def history(run: Path) -> dict[int, float]:
    """step -> logged loss, from the newest checkpoint of iteration 0's training."""
    state = newest_checkpoint(run / "iter-0" / "train" / "checkpoints") / "state.json"
    return {h["step"]: h["loss"] for h in json.loads(state.read_text())["history"]}


def two_task_profile(tmp_path, **train) -> str:
    profile = yaml.safe_load((ROOT / "configs" / "cluster" / "local.yaml").read_text())
    profile["stages"] = {"train": {"tasks_per_node": 2, **train}}
    path = tmp_path / "two-tasks.yaml"
    path.write_text(yaml.safe_dump(profile))
    return str(path)


@pytest.mark.slurm
def test_ranks_of_two_srun_tasks_meet_and_rank_zero_records_the_unit(slurm, ranks_stage, tmp_path, tiny_world):  # noqa: F811
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    args = ["--config", str(cfg), "--executor", "slurm", "--cluster", two_task_profile(tmp_path), "--stages", "meet"]
    assert driver_main(args) == 0
    entry = Manifest(tmp_path / "runs" / "t").stage(0, "meet")
    assert entry["state"] == "done" and entry["allocations"] == 1, entry
    metrics = entry["metrics"]
    assert metrics["world"] == 2 and metrics["sum"] == 3.0  # ranks 0 and 1, all-reduced
    assert sorted(w.rsplit(":", 1)[1] for w in metrics["where"]) == ["0", "1"]  # one rank per srun task
    assert len({w.split(":")[1] for w in metrics["where"]}) == 2


def test_only_the_train_stage_runs_on_several_tasks(tmp_path):
    profile = yaml.safe_load((ROOT / "configs" / "cluster" / "local.yaml").read_text())
    profile["stages"] = {"generate": {"nodes": 2}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(profile))
    with pytest.raises(Exception, match=r"stages.generate.nodes: only the train stage runs on several nodes"):
        load_profile(path)
    profile["stages"] = {"train": {"gres": "gpu:H100:4", "gpus_per_node": 8}}
    path.write_text(yaml.safe_dump(profile))
    with pytest.raises(Exception, match=r"stages.train.gpus_per_node: 8 processes per node, but stages.train.gres asks "
                                        r"for 4 GPU\(s\)"):
        load_profile(path)
    profile["stages"] = {"train": {"gres": "gpu:a100", "gpus_per_node": 4}}  # no count: one GPU, as sbatch reads it
    path.write_text(yaml.safe_dump(profile))
    with pytest.raises(Exception, match=r"asks for 1 GPU\(s\) \(gpu:a100\)"):
        load_profile(path)
    profile["stages"] = {"train": {"gres": "gpu:a100:4", "gpus_per_node": 4}}
    path.write_text(yaml.safe_dump(profile))
    assert load_profile(path).resources("train").gpus_per_node == 4


@pytest.mark.slurm
@pytest.mark.slow
def test_a_two_rank_training_job_stopped_by_usr2_requeues_and_ends_as_one_process_does(
        slurm, cleanup, tmp_path, tiny_world):  # noqa: F811
    """DDP training as one SLURM job of two srun tasks (one torchrun rank each). USR2 to the job,
    as SLURM sends it before a time limit or at a preemption: both ranks stop at the same step,
    save, and submitit requeues the job; the next allocation resumes from that checkpoint and
    ends at the last step. Its losses are one process's to 1e-4 over the first 10 steps; later
    the two trajectories drift apart by rounding (two ranks' sums are not added in one
    process's order, and lr 0.01 amplifies it), so only the step is compared at the end; exact
    resume (kill, or stop, and go on to the uninterrupted run's loss) is tests/test_distributed.py's."""
    runs, procs = cleanup
    cfg = demo_config(tmp_path, tiny_world)
    sets = ["train.max_steps=600", "train.save_steps=50", "train.log_steps=1", "train.batch_size=16"]
    run = tmp_path / "runs" / "ranks"
    runs.append(run)
    data = ROOT / "data" / "tiny" / "train.jsonl"
    write_verified(run, data, 200)
    log = tmp_path / "ranks.log"
    args = driver_args(cfg, Path(two_task_profile(tmp_path)), [*sets, "train.distributed=ddp"], "--stages", "train",
                       "--run", "ranks")
    driver = start_driver(args, log, procs)
    checkpoints = run / "iter-0" / "train" / "checkpoints"
    wait_for(lambda: newest_checkpoint(checkpoints) is not None or driver.poll() is not None, timeout=300)
    assert driver.poll() is None, log.read_text()
    job = Manifest(run).stage(0, "train")["job_ids"]["0"]
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    out = finish(driver, log, timeout=600)

    entry = Manifest(run).stage(0, "train")
    assert entry["state"] == "done", out
    assert entry["allocations"] >= 2 and entry["requeued"] == entry["allocations"] - 1, entry
    stopped_at = entry["resumed_from"]
    assert 0 < stopped_at < 600
    err = "".join(p.read_text() for p in (run / "logs" / job).glob("*_log.err"))
    assert err.count("caught SIGUSR2: stopping at the next safe point") >= 2, err[-2000:]  # each rank, once

    one = load_config(cfg, [*sets, "name=one", f"run_root={tmp_path / 'runs'}"])
    write_verified(one.run_dir, data, 200)
    reference = run_stage_unit(one, 0, "train")
    assert entry["metrics"]["step"] == reference["step"] == 600
    two, alone = history(run), history(one.run_dir)
    early = [s for s in alone if s <= 10]
    assert len(early) == 10 and all(abs(two[s] - alone[s]) <= 1e-4 * alone[s] for s in early), (two, alone)
    assert sorted(two) == sorted(alone) == list(range(1, 601))  # every step logged once, across allocations
    print(f"two ranks: stopped at step {stopped_at}, {entry['allocations']} allocations, final loss "
          f"{entry['metrics']['loss']:.6f} (one process: {reference['loss']:.6f})")


def test_torchruns_ranks_share_their_tasks_cpus(monkeypatch):
    """Each rank takes its share of the srun task's CPUs, never fewer than one, so four ranks of
    a 16-CPU task do not start 64 threads."""
    import torch

    from jobs.allocation import set_threads

    before = torch.get_num_threads()
    try:
        for cpus, ranks, threads in [("16", "4", 4), ("2", "4", 1), ("3", None, 3)]:
            monkeypatch.setenv("SLURM_CPUS_PER_TASK", cpus)
            if ranks is None:
                monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
            else:
                monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
            set_threads(None)
            assert torch.get_num_threads() == threads, (cpus, ranks)
    finally:
        torch.set_num_threads(before)
