"""A unit that fails, for every stage, on the plain sbatch path of the REAL local cluster
(slurm/unit.sbatch -> python -m jobs.sbatch): recorded failed with one line, redone alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill import pipeline
from distill.config import load_config
from tests.conftest import ROOT
from tests.test_slurm_pipeline import slurm  # noqa: F401 (the fixture)
from tests.test_stages import BLOCKED, check_failed_then_redone, finished_run

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_world):
    return finished_run(tmp_path_factory.mktemp("sbatch-failures"), tiny_world)


def sbatch_wait(*args: str, out: Path) -> int:
    """Submit one of slurm/*.sbatch and wait for it to end; its exit status (an array's highest)."""
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["sbatch", "--wait", "--time=10", f"--output={out}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False, timeout=600)
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BLOCKED))
def test_a_failing_unit_is_recorded_and_redone_alone_through_plain_sbatch(slurm, finished, name, tmp_path):  # noqa: F811
    cfg, run = finished
    config = load_config(cfg)

    def launch(it: int, stage_name: str, expect_ok: bool) -> str:
        stage = pipeline.stage(stage_name)
        logs = tmp_path / f"{stage_name}-{'ok' if expect_ok else 'fail'}"
        array = [f"--array=0-{len(stage.units(config, it)) - 1}"] if stage.sharded else []
        status = sbatch_wait(*array, "slurm/unit.sbatch", stage_name, str(cfg), str(it), out=Path(f"{logs}-%A_%a.out"))
        if status == 0 and stage.sharded:
            status = sbatch_wait("slurm/merge.sbatch", str(cfg), str(it), stage_name, out=Path(f"{logs}-merge.out"))
        text = "".join(p.read_text() for p in sorted(tmp_path.glob(f"{logs.name}-*.out")))
        assert (status == 0) == expect_ok, text[-3000:]
        if not expect_ok:
            errors = [line for line in text.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1 and errors[0].startswith(f"error: {stage.describe(BLOCKED[stage_name][1])}: "), text
        return text

    check_failed_then_redone(run, cfg, name, launch)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BLOCKED))
def test_a_failing_unit_is_recorded_and_redone_alone_through_submitit_on_slurm(slurm, finished, name, capsys):  # noqa: F811
    from jobs.driver import main as driver_main

    cfg, run = finished

    def launch(it: int, stage: str, expect_ok: bool) -> str:
        plan = (["--baseline", "--iter", str(it)] if stage.startswith("baseline_")
                else ["--iter", str(it), "--stages", stage])
        status = driver_main(["--config", str(cfg), "--executor", "slurm", "--cluster", "local", *plan])
        err = capsys.readouterr().err
        assert status == (0 if expect_ok else 2), err
        return err

    check_failed_then_redone(run, cfg, name, launch)
