"""A full disk at every kind of write is one line naming the filesystem and the file, the
manifest records the unit failed (or, when the manifest itself cannot be written, the command
says so and exits 2 with the manifest unchanged), and a rerun after freeing space ends with
outputs identical to an uninterrupted run's.

Each trial mounts a small tmpfs exactly where one stage writes (so the manifest, elsewhere,
can still record the failure) and fills it. Mounting needs root: without it the tests skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from distill import pipeline
from distill.config import load_config
from distill.integrity import content_hash
from distill.layout import RunPaths
from distill.manifest import Manifest
from distill.runner import open_run, run_unit
from tests.conftest import ROOT, merge_stage_units, run_stage_unit
from tests.test_integrity import finished_verify

pytestmark = pytest.mark.slow


@pytest.fixture
def disks() -> Iterator[list[Path]]:
    mounted: list[Path] = []
    yield mounted
    for mnt in reversed(mounted):
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def mount(disks: list[Path], where: Path, size: str = "16m") -> Path:
    where.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    disks.append(where)
    return where


@contextmanager
def full(where: Path) -> Iterator[None]:
    """The filesystem at `where` filled to the last byte while the block runs."""
    filler = where / ".filler"
    with filler.open("wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (1 << 16))
                fh.flush()
        except OSError:
            pass
    assert os.statvfs(where).f_bavail == 0
    try:
        yield
    finally:
        filler.unlink()


def configs(tiny_world, tmp_path: Path, *sets: str):
    path = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs", name="r")
    return load_config(path, list(sets)), load_config(path, [*sets, "name=ref"])


def failed(cfg, name: str, key: str = "0") -> str:
    outcome = run_unit(cfg, 0, pipeline.stage(name), key, progress=False)
    assert outcome.state == "failed", outcome
    assert Manifest(cfg.run_dir).stage(0, name).get("state") in ("failed", "running")
    return outcome.error


def one_line_about(error: str, disk: Path) -> None:
    assert error.startswith(f"no space left on {disk} while writing {disk}/"), error
    assert error.endswith("; free space and rerun") and "\n" not in error


def test_generation(tiny_world, tmp_path, disks):
    cfg, ref = configs(tiny_world, tmp_path, "generation.n=2", "generation.temperature=0.7")
    disk = mount(disks, RunPaths(cfg.run_dir).iteration(0) / "generate")
    with full(disk):
        one_line_about(failed(cfg, "generate", "0"), disk)
    assert Manifest(cfg.run_dir).stage(0, "generate")["shards"]["0"]["state"] == "failed"
    for c in (cfg, ref):
        for shard in ("0", "1"):
            run_stage_unit(c, 0, "generate", shard)
        merge_stage_units(c, 0, "generate")
    assert RunPaths(cfg.run_dir).generations(0).read_bytes() == RunPaths(ref.run_dir).generations(0).read_bytes()


def test_checkpoint(tiny_world, tmp_path, disks):
    cfg, ref = configs(tiny_world, tmp_path)
    finished_verify(cfg), finished_verify(ref)
    disk = mount(disks, RunPaths(cfg.run_dir).train(0).checkpoints)
    with full(disk):
        error = failed(cfg, "train")
    one_line_about(error, disk)
    assert "step-00000003" in error and not list(disk.iterdir())  # the partial checkpoint is gone
    got, want = run_stage_unit(cfg, 0, "train"), run_stage_unit(ref, 0, "train")
    assert (got["step"], got["loss"]) == (want["step"], want["loss"])
    assert content_hash(RunPaths(cfg.run_dir).student(0)) == content_hash(RunPaths(ref.run_dir).student(0))


def test_final_save(tiny_world, tmp_path, disks):
    cfg, ref = configs(tiny_world, tmp_path)
    finished_verify(cfg), finished_verify(ref)
    train_dir = mount(disks, RunPaths(cfg.run_dir).train(0).root)
    mount(disks, RunPaths(cfg.run_dir).train(0).checkpoints)  # checkpoints still fit
    with full(train_dir):
        error = failed(cfg, "train")
    one_line_about(error, train_dir)
    assert error.startswith(f"no space left on {train_dir} while writing {train_dir / 'model'};")
    assert not [p for p in train_dir.iterdir() if p.name.startswith(".tmp-")]
    run_stage_unit(cfg, 0, "train"), run_stage_unit(ref, 0, "train")
    entry = Manifest(cfg.run_dir).stage(0, "train")
    assert entry["resumed_from"] == 6  # nothing trained again: the model is saved from the last checkpoint
    assert content_hash(RunPaths(cfg.run_dir).student(0)) == content_hash(RunPaths(ref.run_dir).student(0))


def test_evaluation(tiny_world, tmp_path, disks):
    cfg, ref = configs(tiny_world, tmp_path)
    for c in (cfg, ref):
        finished_verify(c)
        run_stage_unit(c, 0, "train")
    disk = mount(disks, RunPaths(cfg.run_dir).iteration(0) / "eval")
    with full(disk):
        one_line_about(failed(cfg, "evaluate", "student:0"), disk)
    for c in (cfg, ref):
        run_stage_unit(c, 0, "evaluate", "student:0")
    ev, ev_ref = RunPaths(cfg.run_dir).eval(0, 1), RunPaths(ref.run_dir).eval(0, 1)
    assert ev.graded_shard("student", 0).read_bytes() == ev_ref.graded_shard("student", 0).read_bytes()


def test_the_manifest_write(tiny_world, tmp_path, disks):
    """The manifest itself cannot be written: the command says so in one line and exits 2, and
    the manifest is as it was."""
    disk = mount(disks, tmp_path / "runs")
    cfg, _ = configs(tiny_world, tmp_path)
    open_run(cfg)
    finished_verify(cfg)
    manifest = RunPaths(cfg.run_dir).manifest
    before = manifest.read_bytes()
    cmd = [sys.executable, "-m", "jobs.sbatch", "train", "--config", str(tmp_path / "c.yaml"), "--iter", "0"]
    with full(disk):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: no space left on {disk} while writing {manifest}; free space and rerun"
    assert manifest.read_bytes() == before
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Manifest(cfg.run_dir).stage(0, "train")["state"] == "done"
