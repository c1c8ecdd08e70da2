"""Cluster profiles, safe-point stopping and the stage CLI, without a cluster."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from distill.errors import ConfigError
from distill.train_config import TrainConfig
from distill.training import newest_checkpoint, train
from jobs.cluster import load_profile
from jobs.driver import main as driver_main
from jobs.sbatch import main as stage_main
from jobs.signals import StopOnSignal
from tests.conftest import ROOT
from tests.test_training import pairs


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def error_of(path: Path | str) -> str:
    with pytest.raises(ConfigError) as exc:
        load_profile(path)
    return str(exc.value)


def test_shipped_profiles_load_and_pace_asks_for_its_placeholders():
    local = load_profile(ROOT / "configs" / "cluster" / "local.yaml")
    assert local.partition == "debug" and local.cpus == 1
    pace = ROOT / "configs" / "cluster" / "pace.yaml"
    assert error_of(pace) == f"{pace}: account: fill in <pi> in 'gts-<pi>'"


def test_pace_profile_resolves_gpus_per_stage(tmp_path):
    text = (ROOT / "configs" / "cluster" / "pace.yaml").read_text().replace("gts-<pi>", "gts-gburdell3")
    pace = load_profile(write(tmp_path, text))
    gen, verify = pace.executor_parameters("generate"), pace.executor_parameters("verify")
    assert gen["slurm_gres"] == "gpu:H100:1" and gen["slurm_account"] == "gts-gburdell3"
    assert gen["slurm_qos"] == "inferno" and gen["slurm_setup"][0] == "module load anaconda3"
    assert "slurm_gres" not in verify and verify["timeout_min"] == 120 and verify["cpus_per_task"] == 8
    assert pace.resources("baseline_train") == pace.resources("train")


@pytest.mark.parametrize(("text", "error"), [
    ("cpus: four\n", "cpus: expected int, got 'four'"),
    ("stages: {train: {time_min: 1.5}}\n", "stages.train.time_min: expected int, got 1.5"),
    ("stages: {trian: {cpus: 2}}\n",
     "stages.trian: unknown key (expected one of: mine, generate, verify, train, evaluate)"),
    ("mem: lots\n", "mem: expected a size like 32G or 4000M, got 'lots'"),
    ("setup: ['conda activate <env>']\n", "setup[0]: fill in <env> in 'conda activate <env>'"),
    ("time_min: 1\nsignal_delay_s: 90\n",
     "signal_delay_s: must be >= 0 and below the shortest time limit (1 min), got 90"),
    ("partition: [a\n", "invalid YAML"),
])
def test_profile_errors_are_one_line_with_the_key_path(tmp_path, text, error):
    path = write(tmp_path, text)
    message = error_of(path)
    assert message.startswith(f"{path}") and error in message and "\n" not in message


def test_unknown_profile_name_lists_the_shipped_ones(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert load_profile("local").source == "configs/cluster/local.yaml"
    assert error_of("nowhere") == "nowhere: cluster profile not found (profiles in configs/cluster: local, pace)"


def test_driver_refuses_an_unfilled_profile_before_submitting(tmp_path, tiny_world, capsys):
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    pace = ROOT / "configs" / "cluster" / "pace.yaml"
    assert driver_main(["--config", str(cfg), "--executor", "slurm", "--cluster", str(pace)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {pace}: account: fill in <pi> in 'gts-<pi>'"
    assert not (tmp_path / "runs").exists()


def test_safe_stop_turns_the_signal_into_a_step_boundary_stop_then_hands_it_over(tiny_world, tmp_path):
    """USR2 in the middle of training: the loop finishes the optimizer step, saves a checkpoint
    there and returns; only then does the handler installed before (submitit's) run."""
    handed: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: handed.append(signum))
    try:
        cfg = TrainConfig(lr=3e-3, max_steps=20, batch_size=4, save_steps=100, max_length=64)
        calls = 0

        def should_stop(stop: StopOnSignal) -> bool:
            nonlocal calls
            calls += 1
            if calls == 3:
                os.kill(os.getpid(), signal.SIGUSR2)  # arrives while the loop runs
            return stop.requested()

        with StopOnSignal(anywhere=False) as stop:
            result = train(tiny_world.student, pairs(), cfg, tmp_path / "out", progress=False,
                           should_stop=lambda: should_stop(stop))
            assert handed == []  # not yet: submitit's handler would requeue and exit right here
            stop.hand_over()
        assert handed == [signal.SIGUSR2]
        assert not result.finished and result.step == 3
        assert newest_checkpoint(tmp_path / "out" / "checkpoints").name == "step-00000003"
        resumed = train(tiny_world.student, pairs(), cfg, tmp_path / "out", progress=False)
        assert resumed.finished and resumed.resumed_from == 3 and resumed.step == 20
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_stage_cli_counts_array_tasks_and_rejects_a_bad_task(tmp_path, tiny_world, capsys):
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    assert stage_main(["count", "generate", "--config", str(cfg), "--iter", "0"]) == 0
    assert stage_main(["count", "evaluate", "--config", str(cfg), "--iter", "0"]) == 0
    assert capsys.readouterr().out.split() == ["2", "3"]  # 2 shards; teacher, base, student x 1 shard
    assert stage_main(["evaluate", "--config", str(cfg), "--iter", "0", "--shard", "3"]) == 2
    assert "evaluate: --shard 3 out of range: this iteration has 3 evaluation task(s), 0-2" in capsys.readouterr().err
