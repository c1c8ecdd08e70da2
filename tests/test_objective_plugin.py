"""Adding an objective is one file: `tests/toy_objective.py`, named by its module path, is
checked with the config, trains (its divergence in the loss), and runs through the driver, the
plain sbatch path on the local cluster, `distill plan`, `distill compare` and `gpu-check`, with
no other file naming it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill import objectives
from distill.config import load_config
from distill.errors import ConfigError
from distill.manifest import Manifest
from tests.conftest import ROOT
from tests.test_slurm_pipeline import slurm  # noqa: F401 (the fixture)
from tests.test_slurm_stages import sbatch_wait
from tests.test_stages import small_config
from tests.toy_objective import SquaredLogProbs

TOY = "tests.toy_objective"


def toy_config(tmp_path, tiny_world, name: str):
    path = small_config(tmp_path, tiny_world, name)
    raw = yaml.safe_load(path.read_text())
    raw["train"]["objective"] = TOY
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("sets, message", [
    ([f"train.objective={TOY}", "train.kd.teacher=offline"],
     "train.kd.teacher: the toy objective needs the teacher online"),
    (["train.objective=tests.no_such_objective"], "train.objective: no module 'tests.no_such_objective'"),
    (["train.objective=tests.conftest"], "train.objective: tests.conftest defines no OBJECTIVE"),
])
def test_the_config_takes_it_by_module_path_and_runs_its_own_check(sets, message):
    cfg = load_config("configs/tiny.yaml", [f"train.objective={TOY}"])
    assert objectives.build(cfg.train).describe() == "squared log-prob distance, alpha 0.5"
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", sets)


def test_it_trains_with_its_divergence_in_the_loss(tiny_world, tmp_path):
    from distill.train_config import TrainConfig
    from distill.training import train
    from tests.test_training import pairs

    weights = {}
    for name in ("sft", TOY):
        cfg = TrainConfig(objective=name, lr=1e-2, max_steps=2, batch_size=4, save_steps=2, log_steps=1)
        result = train(tiny_world.student, pairs()[:8], cfg, tmp_path / name, progress=False,
                       teacher_path=tiny_world.teacher)
        assert result.finished and result.loss == result.loss
        weights[name] = load_file(str(result.model_dir / "model.safetensors"))
    assert SquaredLogProbs.calls > 0
    # Same seed, same data: only the toy's term can make the two students differ.
    assert any(not torch.equal(weights["sft"][k], weights[TOY][k]) for k in weights["sft"])


@pytest.mark.slurm
def test_it_trains_in_the_driver_and_on_the_plain_sbatch_path(slurm, tiny_world, tmp_path):  # noqa: F811
    from jobs.driver import main as driver_main

    cfg = toy_config(tmp_path, tiny_world, "toy")
    run = tmp_path / "runs" / "toy"
    assert driver_main(["--config", str(cfg), "--executor", "local", "--stages", "generate,verify,train"]) == 0
    first = Manifest(run).stage(0, "train")
    assert first["state"] == "done" and first["metrics"]["step"] == 4
    # Train again as a plain sbatch job (slurm/unit.sbatch train -> python -m jobs.sbatch), which
    # imports the objective by its module path in a process of its own.
    with Manifest(run).update() as data:
        del data["iterations"]["0"]["stages"]["train"]
    (run / "iter-0" / "train").rename(tmp_path / "driver-train")
    status = sbatch_wait("slurm/unit.sbatch", "train", str(cfg), "0", out=tmp_path / "train-%j.out")
    text = "".join(p.read_text() for p in tmp_path.glob("train-*.out"))
    assert status == 0, text[-3000:]
    again = Manifest(run).stage(0, "train")
    assert again["state"] == "done" and again["metrics"]["loss"] == pytest.approx(first["metrics"]["loss"], rel=1e-4)


def test_plan_compare_and_gpu_check_take_it(tiny_world, tmp_path):
    from distill.compare import compare
    from distill.gpucheck import GpuCheck
    from distill.jsonl import read_jsonl, write_jsonl

    def peak(objective: str) -> int:
        proc = subprocess.run([sys.executable, "-m", "distill", "plan", "--config", "configs/tiny.yaml", "--json",
                               "--set",
                               f"train.objective={objective}"], cwd=ROOT, capture_output=True, text=True, check=True)
        return json.loads(proc.stdout)["train"]["off"]["peak"]

    # An online teacher and the full-vocabulary chunk: planned as kd is, above sft.
    assert peak(TOY) == peak("kd") > peak("sft")

    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    problems = read_jsonl(tiny_world.data / "train.jsonl")
    write_jsonl(tmp_path / "runs" / "t" / "iter-0" / "verified.jsonl",
                [{"id": f"{p['id']}#0", "problem_id": p["id"], "question": p["question"], "gold": p["answer"],
                  "response": p["solution"], "correct": True} for p in problems])
    compare(cfg, [TOY], [], steps=2, progress=False)
    rows = json.loads((tmp_path / "runs" / "t" / "compare" / "steps-2" / "compare.json").read_text())
    assert rows[TOY]["settings"] == "squared log-prob distance, alpha 0.5" and rows[TOY]["steps"] == 2

    check = GpuCheck(tmp_path / "gpu-check", [TOY])
    check.build()
    (row,) = check.objective_checks()
    assert row.check == "toy: squared log-prob distance" and row.status == "pass", row

