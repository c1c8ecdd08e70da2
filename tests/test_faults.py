"""The fault-injection suite (bench/faults.py) at a small size: one kill of each kind."""

import json
import subprocess
import sys

import pytest

from bench.faults import KINDS
from tests.conftest import ROOT


@pytest.mark.slow
def test_random_kills_lose_nothing_and_repeat_nothing(tmp_path):
    out = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, "bench/faults.py", "--trials", str(len(KINDS)), "--seed", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = json.loads(out.read_text())["trials"]
    assert len(trials) == len(KINDS) and not [t for t in trials if t["problems"]]
    assert sum(t["killed"] for t in trials) >= len(KINDS) - 2  # most kills land before the unit ends
    train = [t for t in trials if t["kind"] == "train"]
    assert train and train[0]["loss_diff"] <= 1e-6
    assert f"{len(KINDS)} trials in" in proc.stdout and "| generate | 1 |" in proc.stdout
