"""Nothing a user types reaches a shell line or a job script unchecked: run names are plain
names, profile values plain sbatch tokens, paths and setup lines one printable line each; the
scripts rendered for every stage with the most permissive accepted values run nothing but
their job."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from distill import pipeline
from distill.config import load_config
from distill.errors import ConfigError
from jobs.cluster import load_profile
from jobs.driver import main as driver_main
from jobs.executors import make_executor
from tests.test_driver import snapshot

HOSTILE_NAMES = ["../escape", "/abs", "a/b", "x\ntouch CANARY", "$(touch CANARY)", "a b", ".hidden", "-rf", ""]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_run_names_are_refused_before_anything_is_written(name, tmp_path, tiny_world, capsys):
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    (tmp_path / "runs").mkdir()
    before = snapshot(tmp_path)
    assert driver_main(["--config", str(cfg), "--executor", "local", f"--run={name}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and ": name: " in err
    assert "not a plain name" in err or "expected string, got None" in err  # --run= is an empty YAML value
    assert snapshot(tmp_path) == before  # nothing created, here or outside
    assert not (tmp_path.parent / "escape").exists() and not Path("/abs").exists()


@pytest.mark.parametrize("key, value", [
    ("run_root", "runs\ntouch CANARY"),
    ("models.teacher", "models/t\r"),
    ("data.train", "data/train.jsonl\x00"),
])
def test_paths_with_control_characters_are_refused(key, value, tiny_world, tmp_path):
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    with pytest.raises(ConfigError, match=f"{key.replace('.', '[.]')}: contains a control character"):
        load_config(cfg, [f"{key}={value!r}".replace("'", '"')])


PROFILE = """partition: debug
account: gts-pi
cpus: 1
time_min: 10
setup:
  - echo "setup, one line; $HOSTNAME stays a shell word here as the user wrote it"
"""


@pytest.mark.parametrize("key, value", [
    ("partition", "debug\\ntouch CANARY"),
    ("account", "gts;touch CANARY"),
    ("qos", "$(touch CANARY)"),
    ("gres", "gpu:1 `touch CANARY`"),
    ("mem", "4G'\\ntouch CANARY"),
    ("stages", '{train: {partition: "a b"}}'),
])
def test_hostile_profile_values_are_refused(key, value, tmp_path):
    path = tmp_path / "p.yaml"
    text = PROFILE.replace("partition: debug\n", "") if key == "partition" else PROFILE
    path.write_text(text + (f"{key}: {value}\n" if key == "stages" else f'{key}: "{value}"\n'))
    with pytest.raises(ConfigError) as exc:
        load_profile(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert ("not a plain sbatch value" in message or "control character" in message), message


def test_setup_lines_with_a_newline_are_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(PROFILE.replace('  - echo "setup', '  - "echo hi\\ntouch CANARY"\n  - echo "setup'))
    with pytest.raises(ConfigError, match=r"setup\[0\]: contains a control character"):
        load_profile(path)


def test_the_job_script_of_every_stage_runs_only_its_job(tmp_path, tiny_world):
    """Render the sbatch script submitit would submit for each registered stage, with the most
    permissive values the checks accept, and run it with a stand-in `srun`: the setup line and
    the job's command run, and nothing else does."""
    profile_path = tmp_path / "p.yaml"
    profile_path.write_text(PROFILE + "qos: 'normal,high'\ngres: 'gpu:H100:2'\nmem: 4G\n")
    profile = load_profile(profile_path)
    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs", name="a-b_c.9"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "srun-calls"
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho "srun $*" >> "{calls}"\n')
    (bin_dir / "srun").chmod(0o755)
    for stage in pipeline.STAGES:
        ex = make_executor("slurm", tmp_path / "logs", name=f"distill-{cfg.name}-{stage.name}", profile=profile,
                           stage=stage.resource_section)
        script = ex._executor._make_submission_file_text("python -u -m submitit.core._submit /logs/job", "uid")
        assert f"#SBATCH --job-name=distill-{cfg.name}-{stage.name}" in script
        path = tmp_path / f"{stage.name}.sh"
        path.write_text(script)
        proc = subprocess.run(["bash", str(path)], cwd=tmp_path, capture_output=True, text=True,
                              env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOSTNAME": "h"})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("setup, one line; h stays"), proc.stdout
    lines = calls.read_text().splitlines()
    assert len(lines) == len(pipeline.STAGES) and all("submitit.core._submit /logs/job" in line for line in lines)
    assert not list(tmp_path.rglob("CANARY"))
