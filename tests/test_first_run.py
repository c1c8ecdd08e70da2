"""What a new user meets in the first hour: models named by hub ID, refusals that leave nothing
behind and repeat the user's own arguments, config changes on a started run, scheduler
refusals in one line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill.config import load_config
from distill.integrity import model_fingerprint
from distill.manifest import Manifest
from distill.runner import open_run
from jobs.driver import main as driver_main
from tests.conftest import ROOT
from tests.test_driver import snapshot
from tests.test_slurm_pipeline import slurm  # noqa: F401 (fixture)
from tests.test_stages import small_config


def hf_cache(hf_home: Path, repo: str, model: Path) -> tuple[Path, str]:
    """A Hugging Face cache holding `model` as `repo`, laid out as `snapshot_download` leaves
    one: content-addressed blobs, a snapshot directory of links to them, refs/main."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    base = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "blobs").mkdir()
    for f in sorted(model.iterdir()):
        blob = base / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return snap, commit


def driver(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """The driver in a process of its own (the Hugging Face settings are read at import)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "jobs.driver", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_a_hub_id_resolves_from_the_cache_offline_and_jobs_load_the_recorded_snapshot(tmp_path, tiny_world):
    hf = tmp_path / "hf"
    snap, commit = hf_cache(hf, "tiny-org/teacher", tiny_world.teacher)
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    cfg.write_text(cfg.read_text().replace(str(tiny_world.teacher), "tiny-org/teacher"))
    offline = {"HF_HOME": str(hf), "HF_HUB_OFFLINE": "1"}
    proc = driver(["--config", str(cfg), "--executor", "local", "--stages", "generate"], offline)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "t"
    recorded = Manifest(run).read()["models"]
    assert recorded == {"teacher": {"ref": "tiny-org/teacher", "revision": commit, "path": str(snap)}}
    assert f"models.teacher: tiny-org/teacher -> {snap}" in proc.stdout
    # Every generation shard was written by the snapshot's files (their fingerprint), loaded by path.
    sources = sorted((run / "iter-0" / "generate").glob("*.source.json"))
    assert len(sources) == 2
    assert {json.loads(p.read_text())["model"] for p in sources} == {f"fingerprint:{model_fingerprint(snap)}"}
    assert Manifest(run).is_done(0, "generate")

    # A hub ID the cache lacks, offline: one line saying how to get it, and no run directory.
    missing = tiny_world.write_config(tmp_path / "m.yaml", tmp_path / "runs", name="m")
    missing.write_text(missing.read_text().replace(str(tiny_world.student), "tiny-org/absent@v2"))
    proc = driver(["--config", str(missing), "--executor", "local"], offline)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert (f"models.student: tiny-org/absent@v2 is not in the Hugging Face cache {hf / 'hub'} and the hub cannot "
            "be reached (HF_HUB_OFFLINE=1): `hf download tiny-org/absent`") in proc.stderr
    assert not (tmp_path / "runs" / "m").exists()


def test_a_job_refuses_a_hub_id_the_run_has_not_resolved(tmp_path, tiny_world):
    from distill.hub import local_models

    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"), ["models.teacher=org/model"])
    with pytest.raises(Exception, match=r"models.teacher: the hub ID org/model has not been resolved for this run"):
        local_models(cfg, {})
    gone = {"teacher": {"ref": "org/model", "revision": "abc", "path": str(tmp_path / "purged")}}
    with pytest.raises(Exception, match=r"the snapshot of org/model this run uses, is gone"):
        local_models(cfg, gone)
    (tmp_path / "purged").mkdir()
    assert local_models(cfg, gone).models.teacher == str(tmp_path / "purged")
    assert local_models(cfg, gone).models.student == cfg.models.student


def test_a_local_path_that_does_not_exist_says_what_a_model_may_be(tmp_path, tiny_world, capsys):
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    assert driver_main(["--config", str(cfg), "--set", "models.student=./no/such/model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "models.student: path not found: ./no/such/model (a model is a local directory " \
        "or a hub ID, org/name[@revision])" in err
    assert not (tmp_path / "runs").exists()


def test_a_refused_later_iteration_on_a_new_name_creates_nothing(tmp_path, tiny_world, capsys):
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    assert driver_main(["--config", str(cfg), "--iter", "2", "--run", "fresh", "--executor", "local"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: fresh: iteration 2 needs iteration 1 finished, but its mine stage is pending: run "
                   f"`make iter ITER=1 CONFIG={cfg} RUN=fresh EXECUTOR=local` first\n")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_finished_run_takes_more_iterations_but_not_another_learning_rate(tmp_path, tiny_world, capsys):
    cfg = small_config(tmp_path, tiny_world, "grow")  # undo.max_iters: 1
    run = tmp_path / "runs" / "grow"
    assert driver_main(["--config", str(cfg), "--executor", "debug", "--undo"]) == 0
    assert sorted(Manifest(run).read()["iterations"]) == ["0", "1"]
    capsys.readouterr()

    more = ["--set", "undo.max_iters=2", "--set", "undo.patience=2"]
    assert driver_main(["--config", str(cfg), "--executor", "debug", "--undo", *more]) == 0
    out = capsys.readouterr().out
    assert "config: undo.max_iters 1 -> 2 (allowed on a started run; in the manifest's history)" in out
    data = Manifest(run).read()
    assert sorted(data["iterations"]) == ["0", "1", "2"]
    assert all(Manifest(run).is_done(2, s) for s in ("mine", "generate", "verify", "train", "evaluate"))
    assert [h["changed"] for h in data["history"]] == [{"undo.max_iters": [1, 2], "undo.patience": [1, 2]}]
    assert yaml.safe_load((run / "config.yaml").read_text())["undo"]["max_iters"] == 2
    assert "iter 0 generate: done, skipped" in out  # nothing finished ran again

    before = snapshot(run)
    assert driver_main(["--config", str(cfg), "--executor", "debug", "--undo", *more, "--set", "train.lr=0.002"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{cfg}: train.lr: 0.01 -> 0.002: differs from the config {run} was started " \
        "with" in err and "undo the change, or start another run (RUN=<new name>)" in err, err
    assert snapshot(run) == before


@pytest.mark.slurm
def test_a_profile_sbatch_refuses_is_one_line_and_the_run_directory_is_unchanged(slurm, tmp_path, tiny_world, capsys):  # noqa: F811
    profile = yaml.safe_load((ROOT / "configs" / "cluster" / "local.yaml").read_text())
    profile["stages"] = {"train": {"gres": "gpu:H100:1"}}  # the local cluster has no GPUs
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(profile))
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    args = ["--config", str(cfg), "--executor", "slurm", "--cluster", str(bad)]
    line = (f"error: {bad}: stages.train.gres: sbatch refused the train jobs (gres=gpu:H100:1): Invalid generic "
            "resource (gres) specification\n")
    assert driver_main(args) == 2
    assert capsys.readouterr().err == line
    assert not (tmp_path / "runs").exists()  # a new run: nothing created

    open_run(load_config(cfg))  # a started run: nothing changed
    run = tmp_path / "runs" / "t"
    before = snapshot(run)
    assert driver_main(args) == 2
    assert capsys.readouterr().err == line
    assert snapshot(run) == before
    queued = subprocess.run(["squeue", "--noheader", "--format=%j"], capture_output=True, text=True).stdout
    assert not [name for name in queued.split() if name.startswith("distill-t-")]  # this run's jobs
