"""`--dry-run`: every stage's units and sbatch settings printed, nothing submitted, nothing written."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from distill.layout import RunPaths
from distill.manifest import Manifest
from distill.runner import open_run
from jobs.driver import main as driver_main
from tests.conftest import ROOT
from tests.test_integrity import config


def contents(root: Path) -> dict[str, tuple[int, str]]:
    """Every file and directory under `root`: mtime and content hash."""
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "")
            for p in sorted(root.rglob("*"))}


def test_a_dry_run_on_the_pace_profile_prints_each_stage_s_sbatch_lines_and_changes_nothing(
        tiny_world, tmp_path, capsys):
    cfg = config(tiny_world, tmp_path)
    open_run(cfg)  # a started run whose generation is done, one evaluation task too
    manifest = Manifest(cfg.run_dir)
    manifest.mark(0, "generate", "done")
    manifest.mark_shard(0, "evaluate", "teacher:0", "done")
    before = contents(tmp_path)
    assert driver_main(["--config", cfg.source, "--cluster", str(ROOT / "configs/cluster/pace.yaml"),
                        "--executor", "slurm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert contents(tmp_path) == before
    assert "nothing is submitted or written" in out
    assert "to fill in before a real run: " in out and "account: fill in <pi>" in out
    stages = re.split(r"\n  (?! )", out)  # a stage line, then its #SBATCH lines
    generate, verify, train, evaluate = (next(s for s in stages if s.startswith(f"{n}:"))
                                         for n in ("generate", "verify", "train", "evaluate"))
    assert generate.startswith("generate: done, skipped")
    assert "#SBATCH --cpus-per-task=8" in verify and "#SBATCH --time=120" in verify and "--gres" not in verify
    assert "#SBATCH --mem=128G" in train and "#SBATCH --gres=gpu:H100:1" in train and "--array" not in train
    assert evaluate.startswith("evaluate: 2 evaluation task(s) base:0, student:0 as one array of 2")
    assert "#SBATCH --array=0-1%2" in evaluate and "#SBATCH --signal=USR2@90" in evaluate
    logs = RunPaths(cfg.run_dir).logs
    assert f"#SBATCH --output={logs}/%A_%a/%A_%a_0_log.out" in evaluate
    assert "#SBATCH --qos=inferno" in evaluate and "#SBATCH --job-name=distill-r-evaluate" in evaluate


def test_a_dry_run_of_a_new_run_creates_no_run_directory_and_lists_the_undo_loop(tiny_world, tmp_path, capsys):
    cfg = config(tiny_world, tmp_path)
    before = contents(tmp_path)
    assert driver_main(["--config", cfg.source, "--executor", "local", "--undo", "--with-baseline", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert contents(tmp_path) == before and not Path(cfg.run_dir).exists()
    assert "iterations 1, 2, ... while the student improves (undo.max_iters=" in out
    assert "  mine: 1 job, as local job(s) on this machine" in out
    assert "then the one-shot baseline at the last iteration run:\n  baseline_train: 1 job" in out


def test_a_dry_run_still_refuses_what_the_real_run_would(tiny_world, tmp_path, capsys):
    cfg = config(tiny_world, tmp_path)
    assert driver_main(["--config", cfg.source, "--executor", "local", "--iter", "1", "--dry-run"]) == 2
    assert "iteration 1 needs iteration 0 finished" in capsys.readouterr().err
