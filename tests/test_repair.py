"""A lost or damaged manifest costs nothing: its previous version is kept beside it, and
`python -m distill repair` rebuilds it from the outputs on disk, after which the next run
redoes nothing that is complete and sound."""

from __future__ import annotations

import json

import pytest

from distill.__main__ import main as distill_main
from distill.manifest import Manifest
from jobs.driver import main as driver_main
from tests.test_driver import demo_config, snapshot

SETS = ["data.train_limit=60", "eval.limit=20", "train.max_steps=20", "train.save_steps=10", "train.batch_size=16",
        "generation.batch_size=32", "eval.batch_size=32"]


def outputs(run) -> dict[str, float]:
    return {p: t for p, t in snapshot(run).items() if "manifest.json" not in p and "driver.lease" not in p}


def contents(run) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in run.rglob("*") if p.is_file() and "manifest.json" not in p.name}


@pytest.mark.slow
def test_repair_rebuilds_a_deleted_manifest_and_the_next_run_redoes_nothing(tmp_path, tiny_world, capsys):
    cfg = demo_config(tmp_path, tiny_world)
    args = ["--config", str(cfg), "--executor", "local"] + [a for s in SETS for a in ("--set", s)]
    assert driver_main(args) == 0
    run = tmp_path / "runs" / "e2e"
    manifest = Manifest(run)
    original = manifest.read()
    assert json.loads(manifest.previous.read_text())["iterations"]  # the version before the last update

    # A truncated manifest: one line naming the file, the backup and the repair command.
    text = manifest.path.read_text()
    manifest.path.write_text(text[: len(text) // 2])
    capsys.readouterr()
    assert distill_main(["status", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {manifest.path}:") and "manifest.json.prev" in err
    assert err.endswith(f"`python -m distill repair --run {run}` rebuilds it from what is on disk")

    manifest.path.unlink()
    before = contents(run)
    assert distill_main(["repair", "--run", str(run)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": done") == 4, printed  # generate, verify, train, evaluate of iteration 0
    rebuilt = manifest.read()
    assert rebuilt["config_hash"] == original["config_hash"]
    for name, entry in original["iterations"]["0"]["stages"].items():
        again = rebuilt["iterations"]["0"]["stages"][name]
        assert again["state"] == "done", (name, again)
        assert again.get("artifacts") == entry.get("artifacts"), name  # the same files, the same hashes
    assert rebuilt["iterations"]["0"]["stages"]["train"]["metrics"]["step"] == 20
    assert (rebuilt["iterations"]["0"]["stages"]["evaluate"]["results"]
            == original["iterations"]["0"]["stages"]["evaluate"]["results"])
    assert contents(run) == before  # merged again, byte for byte the same

    after_repair = outputs(run)
    assert driver_main(args) == 0
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 4 and "submitted" not in out
    assert outputs(run) == after_repair


@pytest.mark.slow
def test_repair_leaves_an_incomplete_unit_to_the_next_run(tmp_path, tiny_world, capsys):
    cfg = demo_config(tmp_path, tiny_world)
    args = (["--config", str(cfg), "--executor", "local", "--stages", "generate"]
            + [a for s in SETS for a in ("--set", s)])
    assert driver_main(args) == 0
    run = tmp_path / "runs" / "e2e"
    shard = run / "iter-0" / "generate" / "shard-00001-of-00002.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines[:-3]))  # three records short
    Manifest(run).path.unlink()
    assert distill_main(["repair", "--run", str(run)]) == 0
    assert "iter 0 generate: 1/2 recovered, the rest runs again" in capsys.readouterr().out
    entry = Manifest(run).stage(0, "generate")
    assert entry["state"] == "running" and entry["shards"]["0"]["state"] == "done" and "1" not in entry["shards"]
    assert driver_main(args) == 0
    out = capsys.readouterr().out
    assert "submitted 1 job(s)" in out
    assert len(shard.read_text().splitlines()) == len(lines)
