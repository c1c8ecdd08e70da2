"""Stages as objects: a new one registered in a few lines runs everywhere the built-in ones do,
and a unit that raises is recorded failed with one line and redone alone, whatever the stage
and whichever launcher ran it (the local submitit executor here; plain sbatch on the local
cluster in tests/test_slurm_stages.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from distill import pipeline
from distill.config import load_config
from distill.layout import RunPaths
from distill.manifest import Manifest
from distill.runner import unit_entry
from jobs.driver import main as driver_main
from jobs.sbatch import main as stage_main
from tests.count_stage import COUNT
from tests.test_driver import demo_config

SMALL = {"data": {"train_limit": 16}, "eval": {"limit": 6, "num_shards": 2, "batch_size": 8},
         "train": {"max_steps": 4, "save_steps": 2, "batch_size": 8}, "generation": {"batch_size": 8},
         "undo": {"probe_limit": 8, "n": 2, "max_iters": 1}}


def small_config(tmp_path: Path, tiny_world, name: str) -> Path:
    """The demo config (its competent teacher) cut down to seconds per stage, in a file (the
    sbatch scripts take a config path and nothing else)."""
    raw = yaml.safe_load(demo_config(tmp_path, tiny_world).read_text())
    raw["name"] = name
    for section, values in SMALL.items():
        raw[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def count_stage():
    pipeline.register(COUNT, after="verify")
    yield COUNT
    pipeline.STAGES.remove(COUNT)


def test_a_new_stage_runs_in_the_driver_the_stage_cli_and_the_status_table(count_stage, tmp_path, tiny_world, capsys):
    cfg = small_config(tmp_path, tiny_world, "counted")
    run = tmp_path / "runs" / "counted"
    # The driver runs it in plan order, as a job of its own (a local submitit job here).
    args = ["--config", str(cfg), "--executor", "local", "--stages", "generate,verify,count_verified"]
    assert driver_main(args) == 0
    out = capsys.readouterr().out
    assert "iter 0 count_verified: running (local executor)" in out
    stages = Manifest(run).read()["iterations"]["0"]["stages"]
    assert stages["count_verified"]["state"] == "done"
    assert stages["count_verified"]["metrics"]["verified"] == stages["verify"]["metrics"]["kept"] > 0
    assert stages["count_verified"]["job_ids"]["0"]
    rows = [line.split()[1] for line in out.splitlines()[-3:]]
    assert rows == ["generate", "verify", "count_verified"]  # the final table, in pipeline order

    # `python -m jobs.sbatch` runs it (and knows when it is done) ...
    common = ["--config", str(cfg), "--iter", "0"]
    assert stage_main(["count_verified", *common]) == 0
    assert capsys.readouterr().out == "count_verified: already done\n"
    with Manifest(run).update() as data:
        del data["iterations"]["0"]["stages"]["count_verified"]
    assert stage_main(["count_verified", *common]) == 0
    assert json.loads(capsys.readouterr().out) == {"verified": stages["verify"]["metrics"]["kept"]}

    # ... and `distill status` shows it between verify and train.
    from distill.__main__ import main as distill_main

    assert distill_main(["status", "--run", str(run)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in table[2:]] == ["generate", "verify", "count_verified"]
    assert "verified=" in table[-1]

    # `distill plan` lists it in both iterations' plans, with the profile section its jobs get.
    assert distill_main(["plan", "--config", str(cfg)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "  iteration 0: generate, verify, count_verified (verify), train, evaluate"
    assert lines[2] == "  iteration 1+ (UNDO): mine, generate, verify, count_verified (verify), train, evaluate"
    assert distill_main(["plan", "--config", str(cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plans"]["first"] == [
        "generate", "verify", "count_verified", "train", "evaluate"]


# -- a unit that fails, for every stage ---------------------------------------------------------------

# stage -> (iteration, the unit made to fail, a path that unit writes). Replacing that path by a
# directory (a file by a file) makes the unit raise inside its work, on any launcher.
BLOCKED = {
    "mine": (1, "0", lambda p: p.mine_responses(1)),
    "generate": (0, "1", lambda p: p.gen_shard(0, 1, 2)),
    "verify": (0, "0", lambda p: p.graded(0)),
    "train": (0, "0", lambda p: p.train(0).checkpoints),
    "evaluate": (0, "student:1", lambda p: p.eval(0, 2).graded_shard("student", 1)),
    "baseline_train": (1, "0", lambda p: p.baseline(1).checkpoints),
    "baseline_evaluate": (1, "oneshot:1", lambda p: p.eval(1, 2).graded_shard("oneshot", 1)),
}


def block(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
        path.write_text("in the way\n")
    else:
        path.unlink(missing_ok=True)
        path.mkdir(parents=True)


def unblock(path: Path) -> None:
    if path.is_dir():
        path.rmdir()
    else:
        path.unlink()


def forget(run: Path, it: int, stage: str) -> None:
    """The stage as never run, its outputs left on disk (they resume)."""
    with Manifest(run).update() as data:
        data["iterations"][str(it)]["stages"].pop(stage, None)


def attempts(run: Path, it: int, name: str) -> dict[str, int]:
    stage = pipeline.stage(name)
    data = Manifest(run).read()
    entry = data["iterations"][str(it)]["stages"][name]
    if not stage.sharded:
        return {"0": entry.get("allocations", 0)}
    return {k: s.get("attempts", 0) for k, s in entry["shards"].items()}


def check_failed_then_redone(run: Path, cfg: Path, name: str, launch) -> None:
    """Run the stage with one unit blocked: that unit is failed in the manifest with one line,
    the others done; unblocked, the next run redoes that unit alone and the stage is done."""
    it, key, where = BLOCKED[name]
    stage = pipeline.stage(name)
    path = where(RunPaths(run))
    forget(run, it, name)
    block(path)
    error = launch(it, name, expect_ok=False)
    entry = unit_entry(Manifest(run).read(), it, stage, key)
    assert entry["state"] == "failed", entry
    assert "\n" not in entry["error"] and "Error" in entry["error"] and path.name in entry["error"], entry["error"]
    assert path.name in error
    before = attempts(run, it, name)
    others = {k: n for k, n in before.items() if k != key}
    assert all(unit_entry(Manifest(run).read(), it, stage, k)["state"] == "done" for k in others)
    unblock(path)
    launch(it, name, expect_ok=True)
    assert Manifest(run).is_done(it, name)
    after = attempts(run, it, name)
    assert after[key] == before[key] + 1 and {k: after[k] for k in others} == others, (before, after)


def finished_run(tmp: Path, tiny_world) -> tuple[Path, Path]:
    """A run with iteration 0, UNDO iteration 1 and the baseline all done (in-process jobs)."""
    cfg = small_config(tmp, tiny_world, "failures")
    assert driver_main(["--config", str(cfg), "--executor", "debug", "--undo", "--with-baseline"]) == 0
    return cfg, tmp / "runs" / "failures"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_world):
    return finished_run(tmp_path_factory.mktemp("failures"), tiny_world)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BLOCKED))
def test_a_failing_unit_is_recorded_and_redone_alone_through_submitit(finished, name, capsys):
    cfg, run = finished

    def launch(it: int, stage: str, expect_ok: bool) -> str:
        plan = (["--baseline", "--iter", str(it)] if stage.startswith("baseline_")
                else ["--iter", str(it), "--stages", stage])
        status = driver_main(["--config", str(cfg), "--executor", "local", *plan])
        err = capsys.readouterr().err
        assert status == (0 if expect_ok else 2), err
        assert expect_ok or (err.count("\n") == 1
                             and err.startswith(f"error: {pipeline.stage(stage).describe(BLOCKED[stage][1])}: "))
        return err

    check_failed_then_redone(run, cfg, name, launch)


def test_the_status_table_keeps_pipeline_order(tmp_path):
    from distill.manifest import format_table

    m = Manifest(tmp_path)
    for stage in ("evaluate", "generate", "train", "zzz", "verify"):
        m.mark(0, stage, "done")
    rows = [line.split()[1] for line in format_table(m.read(), pipeline.names()).splitlines()[1:]]
    assert rows == ["generate", "verify", "train", "evaluate", "zzz"]


def test_configs_load_without_the_model_libraries():
    """The stage registry (and so the driver) imports no torch or transformers."""
    from tests.conftest import run_python

    out = run_python("import sys; from distill import pipeline; from jobs import driver, sbatch; "
                     "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    assert load_config  # the schema is importable on its own too
