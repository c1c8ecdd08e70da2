"""The UNDO loop on the plain sbatch path of the REAL local cluster, no driver: slurm/undo.sh
submits iteration 0 as a chain read from the stage registry, a stage added by the config's
`plugins` included, and a job at the end of each chain asks distill (distill/undo.py, as the
driver does) whether to go on, submitting iteration 1's chain from inside the allocation."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from distill.manifest import Manifest
from tests.conftest import ROOT
from tests.slurm_cluster import queue_dump
from tests.test_slurm_pipeline import slurm  # noqa: F401 (the fixture)
from tests.test_stages import small_config

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def own_jobs() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if " distill-" in line]


def test_undo_sh_runs_iterations_as_chains_with_a_registered_stage_and_stops_as_the_driver_would(
        slurm, tiny_world, tmp_path):  # noqa: F811
    path = small_config(tmp_path, tiny_world, "chained")
    raw = yaml.safe_load(path.read_text())
    raw["plugins"] = ["tests.count_plugin"]
    raw["generation"]["num_shards"] = 1
    raw["eval"].update({"num_shards": 1, "baselines": False})
    raw["undo"].update({"max_iters": 1, "patience": 1})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "DISTILL_ARRAY_PARALLELISM": "2"}
    proc = subprocess.run(["bash", "slurm/undo.sh", str(path), f"--output={logs}/%x-%j.out", "--time=10"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    submitted = [line.split()[0] for line in proc.stdout.splitlines()]
    assert submitted == ["generate", "merge", "verify", "count_verified", "train", "evaluate", "merge", "next"]

    deadline = time.monotonic() + 600
    while own_jobs() and time.monotonic() < deadline:
        time.sleep(2)
    text = "\n".join(f"== {p.name}\n{p.read_text()}" for p in sorted(logs.glob("*.out")))
    assert not own_jobs(), queue_dump() + text[-4000:]

    m = Manifest(tmp_path / "runs" / "chained")
    for it, stages in ((0, ["generate", "verify", "count_verified", "train", "evaluate"]),
                       (1, ["mine", "generate", "verify", "count_verified", "train", "evaluate"])):
        for stage in stages:
            assert m.stage(it, stage)["state"] == "done", (it, stage, text[-4000:])
    assert m.stage(1, "count_verified")["metrics"]["verified"] == m.stage(1, "verify")["metrics"]["kept"]
    nexts = sorted(logs.glob("distill-next-*.out"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    assert len(nexts) == 2, text[-4000:]
    assert "distill: the UNDO loop ends after iteration 1" in nexts[1].read_text()
    assert "undo: iteration 1 is undo.max_iters" in nexts[1].read_text()
    assert not (tmp_path / "runs" / "chained" / "iter-2").exists()
