"""A distributed unit on the local SLURM cluster: one job of two srun tasks, each running
torchrun with one process, the way a two-node job runs; the ranks meet on the first task's
host (c10d rendezvous), and rank 0 alone records the unit."""

from __future__ import annotations

import pytest
import yaml

from distill import pipeline
from distill.manifest import Manifest
from jobs.cluster import load_profile
from jobs.driver import main as driver_main
from tests.conftest import ROOT
from tests.ranks_stage import RANKS
from tests.test_slurm_pipeline import slurm  # noqa: F401 (fixture)


@pytest.fixture
def ranks_stage():
    pipeline.register(RANKS, after="verify")
    yield RANKS
    pipeline.STAGES.remove(RANKS)


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
                                        r"for 4 GPUs"):
        load_profile(path)
