"""What a run cost: every allocation of a unit recorded once, and the report's sums of them."""

from __future__ import annotations

import itertools
import time

import pytest

from distill import pipeline
from distill.cost import OPEN, SPENT, Cost, cost_rows, resources
from distill.layout import RunPaths
from distill.manifest import Manifest
from distill.report import cost_table, cost_with_gains
from distill.runner import claim, run_unit
from tests.test_integrity import config, finished_verify


def test_resources_inside_a_slurm_job_are_per_node_times_nodes():
    env = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_CPUS_ON_NODE": "16", "SLURM_GPUS_ON_NODE": "4"}
    assert resources(env) == {"nodes": 2, "cpus": 32, "gpus": 8}
    env = {"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert resources(env) == {"nodes": 1, "cpus": 8, "gpus": 2}


def test_resources_outside_slurm_are_this_process_s_cpus_and_visible_gpus():
    import os

    got = resources({"CUDA_VISIBLE_DEVICES": "1,3,5"})
    assert got == {"nodes": 1, "cpus": len(os.sched_getaffinity(0)), "gpus": 3}
    assert resources({"CUDA_VISIBLE_DEVICES": ""})["gpus"] == 0


def test_wall_time_counts_overlapping_allocations_once_and_hours_count_each():
    spent = [{"start": 0, "seconds": 100, "cpus": 2, "gpus": 1}, {"start": 50, "seconds": 100, "cpus": 4, "gpus": 0},
             {"start": 400, "seconds": 20, "cpus": 1, "gpus": 2}]
    cost = Cost.of(spent)
    assert cost.wall_s == 170  # 0-150 and 400-420
    assert cost.cpu_h == pytest.approx((200 + 400 + 20) / 3600)
    assert cost.gpu_h == pytest.approx((100 + 40) / 3600)
    assert cost.allocations == 3 and Cost.of([]) is None


def spent(cfg, stage: str = "train") -> list[dict]:
    return Manifest(cfg.run_dir).stage(0, stage).get(SPENT, [])


@pytest.mark.slow
def test_a_stopped_and_resumed_training_stage_costs_both_allocations(tiny_world, tmp_path):
    cfg = config(tiny_world, tmp_path, "train.max_steps=8", "train.save_steps=2")
    finished_verify(cfg)
    calls = itertools.count()
    first = run_unit(cfg, 0, pipeline.stage("train"), "0", progress=False, should_stop=lambda: next(calls) >= 3)
    assert first.state == "stopped"
    assert [a["ended"] for a in spent(cfg)] == ["pending"]
    time.sleep(0.5)  # a gap between allocations (the requeued job waiting): not wall time
    assert run_unit(cfg, 0, pipeline.stage("train"), "0", progress=False).state == "done"

    allocations = spent(cfg)
    assert [a["ended"] for a in allocations] == ["pending", "done"]
    assert OPEN not in Manifest(cfg.run_dir).stage(0, "train")
    cpus = resources()["cpus"]
    assert all(a["cpus"] == cpus and a["gpus"] == 0 and a["seconds"] > 0 for a in allocations)
    seconds = sum(a["seconds"] for a in allocations)
    row = next(r for r in cost_rows(Manifest(cfg.run_dir).read(), pipeline.names(), set()) if r["stage"] == "train")
    assert row["allocations"] == 2
    assert row["wall_s"] == pytest.approx(seconds, abs=0.1)
    assert row["cpu_hours"] == pytest.approx(seconds * cpus / 3600, abs=1e-4)
    assert allocations[1]["start"] - (allocations[0]["start"] + allocations[0]["seconds"]) >= 0.5


def test_an_allocation_killed_without_a_word_is_closed_at_its_last_heartbeat(tiny_world, tmp_path):
    """A unit's process SIGKILLed (OOM, a node lost): the next claim closes its allocation at the
    time its heartbeat file last names, and the report counts it."""
    cfg = config(tiny_world, tmp_path)
    stage = pipeline.stage("train")
    manifest = Manifest(cfg.run_dir)
    claim(manifest, 0, stage, "0", job_id="41")
    with manifest.update() as data:  # as if another process, now gone, had claimed it 30 s ago
        entry = data["iterations"]["0"]["stages"]["train"]
        entry[OPEN].update(start=entry[OPEN]["start"] - 30, pid=2 ** 22 + 1)
        entry["pid"] = 2 ** 22 + 1
        beat_time = entry[OPEN]["start"] + 12
    beat = RunPaths(cfg.run_dir).heartbeat(0, "train", "0")
    beat.parent.mkdir(parents=True, exist_ok=True)
    beat.write_text(f"{beat_time:.3f}\n")
    claim(manifest, 0, stage, "0", job_id="41")  # the requeued job's next allocation
    lost, = spent(cfg)
    assert lost["ended"] == "lost" and lost["seconds"] == pytest.approx(12, abs=0.01)
    assert Manifest(cfg.run_dir).stage(0, "train")[OPEN]["pid"] != entry["pid"]


def test_the_report_shows_each_stage_and_iteration_with_accuracy_gained_per_hour():
    def unit(start: float, seconds: float, gpus: int = 0) -> dict:
        return {SPENT: [{"start": start, "seconds": seconds, "cpus": 4, "gpus": gpus, "ended": "done"}]}

    result = {"accuracy": 0.5, "tokens_mean": 10.0}
    data = {"iterations": {"0": {"stages": {
        "generate": {"state": "done", "shards": {"0": unit(0, 3600, 1), "1": unit(0, 1800, 1)}},
        "train": {"state": "done", **unit(3600, 3600, 2)},
        "evaluate": {"state": "done", **unit(7200, 360), "results": {
            "base": {**result, "accuracy": 0.1}, "student": result}},
        "baseline_train": {"state": "done", **unit(9000, 1800, 1)},
    }}}}
    rows = cost_with_gains(data)
    by_stage = {r["stage"]: r for r in rows}
    assert list(by_stage) == ["generate", "train", "evaluate", "baseline_train", "(iteration total)",
                              "(one-shot baseline total)"]
    assert by_stage["generate"]["wall_s"] == 3600 and by_stage["generate"]["gpu_hours"] == 1.5
    total = by_stage["(iteration total)"]
    assert total["wall_s"] == 3600 * 2 + 360 and total["gpu_hours"] == 3.5
    assert total["cpu_hours"] == pytest.approx(4 * (3600 + 1800 + 3600 + 360) / 3600, abs=1e-3)
    assert total["gain_per_hour"] == f"{40 / 3.5:+.1f} points/GPU-h"  # 10% -> 50%
    assert "gain_per_hour" not in by_stage["(one-shot baseline total)"]  # no one-shot evaluation yet
    table = cost_table(rows)
    assert "| 0 | generate | 1h00m | 6.000 | 1.500 | 2 | - |" in table
    assert "| 0 | (iteration total) | 2h06m | 10.400 | 3.500 | 4 | +11.4 points/GPU-h |" in table
