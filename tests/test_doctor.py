"""`distill doctor`: one line per check, and a non-zero exit only for what blocks a run."""

from __future__ import annotations

import subprocess
import sys

from distill.doctor import BLOCKS, NOTE, OK, flock_excludes, library_checks, lock_checks, mount_of
from tests.conftest import ROOT
from tests.test_integrity import config


def doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill", "doctor", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, check=False)


def test_here_it_reports_no_gpu_a_working_flock_and_room_for_the_run_and_exits_zero(tiny_world, tmp_path):
    cfg = config(tiny_world, tmp_path)
    proc = doctor("--config", cfg.source)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any(line.startswith(f"{NOTE} no GPU visible here") for line in lines), lines
    assert any(line.startswith(f"{OK} run root {cfg.run_root} is on ") and "flock excludes a second process" in line
               for line in lines), lines
    trainings = f"{cfg.undo.max_iters + 2} trainings x ({cfg.train.keep_checkpoints} checkpoint(s)"  # + baseline
    assert any(line.startswith(OK) and "the run writes up to" in line and trainings in line for line in lines), lines
    assert lines[-1] == "nothing blocking"


def test_a_profile_sbatch_would_refuse_blocks_and_says_which_key(tmp_path):
    proc = doctor("--cluster", "pace")
    assert proc.returncode == 1, proc.stdout
    blocking = [line for line in proc.stdout.splitlines() if line.startswith(BLOCKS)]
    assert len(blocking) == 1 and proc.stdout.splitlines()[-1] == "1 blocking problem(s)", proc.stdout
    assert "pace.yaml: account: fill in <pi>" in blocking[0] or "no sbatch/squeue on PATH" in blocking[0]


def test_flock_keeps_a_second_process_out_on_the_local_disk(tmp_path):
    assert flock_excludes(tmp_path) is None


def test_a_filesystem_whose_flock_locks_for_one_node_only_blocks_unless_the_lock_is_soft(tmp_path):
    """Simulated by the mount table: the run root on Lustre mounted `localflock`, or NFS `nolock`."""
    for fstype, options in (("lustre", "rw,localflock,lazystatfs"), ("nfs4", "rw,vers=4.2,local_lock=flock")):
        mounts = f"/dev/sda1 / ext4 rw 0 0\nmds@tcp:/fs {tmp_path} {fstype} {options} 0 0\n"
        (check,) = lock_checks(tmp_path / "runs", "flock", mounts)
        assert check.mark == BLOCKS and f"is on {fstype} ({tmp_path})" in check.line, check
        assert "makes flock lock for this node only: set `lock: soft`" in check.line, check
        (soft,) = lock_checks(tmp_path / "runs", "soft", mounts)
        assert soft.mark == OK and "`lock: soft` does not need flock" in soft.line
    shared = f"mds@tcp:/fs {tmp_path} lustre rw,flock 0 0\n"
    (check,) = lock_checks(tmp_path, "flock", shared)
    assert check.mark == OK and "other nodes' processes are excluded too" in check.line


def test_the_mount_holding_a_path_is_the_longest_prefix():
    mounts = "a / ext4 rw 0 0\nb /scratch lustre rw,flock 0 0\nc /scratch2 nfs rw 0 0\n"
    assert mount_of(ROOT.parent / "x", mounts)[1] in ("ext4", "lustre", "nfs")
    from pathlib import Path

    assert mount_of(Path("/scratch/u/runs"), mounts)[:2] == ("/scratch", "lustre")
    assert mount_of(Path("/scratch2"), mounts)[:2] == ("/scratch2", "nfs")
    assert mount_of(Path("/home/u"), mounts)[:2] == ("/", "ext4")


def test_a_missing_pinned_library_blocks_and_another_version_is_a_note():
    import importlib.metadata

    torch = importlib.metadata.version("torch").split("+")[0]
    lines = library_checks({"torch": torch, "pyyaml": "0.0.1", "no-such-package-xyz": "1.0"})
    marks = {c.mark: c.line for c in lines}
    assert "1 of 3 pinned libraries at their pins" in marks[OK]
    assert "pyyaml" in marks[NOTE] and "(pinned 0.0.1)" in marks[NOTE]
    assert "not installed: no-such-package-xyz" in marks[BLOCKS]
