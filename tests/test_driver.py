"""The iteration driver end to end: real submitit jobs, real models, the manifest in between."""

import json
from pathlib import Path

import pytest

from distill.manifest import Manifest
from jobs.driver import main as driver_main
from tests.conftest import ROOT, run_python

TINY = ROOT / "models" / "tiny"


def demo_config(tmp_path: Path, tiny_world) -> Path:
    """The committed demo teacher (it must be competent for verification to keep anything)."""
    text = (ROOT / "configs" / "tiny.yaml").read_text()
    text = text.replace("name: tiny", f"name: e2e\nrun_root: {tmp_path / 'runs'}")
    for key in ("teacher", "student", "train", "validation", "test"):
        for line in text.splitlines():
            if line.strip().startswith(f"{key}: ") and ("models/" in line or "data/" in line):
                rel = line.split(": ", 1)[1]
                text = text.replace(line, line.replace(rel, str(ROOT / rel)))
    path = tmp_path / "e2e.yaml"
    path.write_text(text)
    return path


def snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")} if root.exists() else {}


@pytest.mark.slow
def test_iteration_zero_end_to_end_then_a_noop(tmp_path, tiny_world, capsys):
    cfg = demo_config(tmp_path, tiny_world)
    sets = ["data.train_limit=60", "eval.limit=20", "train.max_steps=20", "train.save_steps=10",
            "train.batch_size=16", "generation.batch_size=32", "eval.batch_size=32"]
    args = ["--config", str(cfg), "--executor", "local"] + [a for s in sets for a in ("--set", s)]
    assert driver_main(args) == 0
    run = tmp_path / "runs" / "e2e"
    data = Manifest(run).read()
    stages = data["iterations"]["0"]["stages"]
    assert {k: v["state"] for k, v in stages.items()} == dict.fromkeys(["generate", "verify", "train", "evaluate"], "done")
    assert stages["generate"]["metrics"]["records"] == 60
    assert set(stages["generate"]["shards"]) == {"0", "1"} and len(stages["generate"]["job_ids"]) == 2
    verified = [json.loads(line) for line in (run / "iter-0" / "verified.jsonl").read_text().splitlines()]
    assert len(verified) == stages["verify"]["metrics"]["kept"] > 30
    assert all(r["correct"] and r["pred_answer"] for r in verified)
    assert stages["train"]["metrics"]["step"] == 20
    results = stages["evaluate"]["results"]
    assert set(results) == {"teacher", "base", "student"}
    graded = [json.loads(line) for line in (run / "iter-0" / "eval" / "teacher" / "graded.jsonl").read_text().splitlines()]
    assert results["teacher"]["n"] == len(graded) == 20
    assert results["teacher"]["correct"] == sum(r["correct"] for r in graded)
    for art in stages["verify"]["artifacts"].values():
        assert (run / art["path"]).exists() and len(art["sha256"]) == 64

    before = snapshot(run)
    # A finished iteration is answered from the manifest alone: no model library is even imported,
    # which is what makes the re-run return in a fraction of a second.
    code = (f"import sys; from jobs.driver import main; rc = main({args!r}); "
            "print('loaded:', sorted({'torch', 'transformers'} & set(sys.modules))); sys.exit(rc)")
    out = run_python(code, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("done, skipped") == 4
    assert "loaded: []" in out.stdout
    assert snapshot(run) == before, "a no-op re-run changed the run directory"
