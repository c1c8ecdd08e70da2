"""Ctrl-C in `python -m distill`: one line, exit status 130, also when it reaches the grading
workers (a terminal sends SIGINT to every process of the job)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import distill.__main__ as cli
from tests.conftest import ROOT


def test_a_command_stopped_by_ctrl_c_says_so_in_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_report", interrupted)
    try:
        assert cli.main(["report", "--run", "runs/none"]) == 130
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # until the process ends
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert capsys.readouterr().err == "stopped\n"


def test_ctrl_c_while_grading_in_worker_processes(tmp_path):
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"gold": str(i),
                                             "response": f"x = \\frac{{{2 * i + 1}}}{{2}} \\boxed{{{i}.5}}"})
                                 + "\n" for i in range(20000)))
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "distill", "grade", "--input", str(responses), "--output",
                                 str(tmp_path / "graded.jsonl"), "--workers", "2"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
        deadline = time.time() + 60
        while "grading: " not in err_path.read_text():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.01)
        time.sleep(0.1)  # while the fork server imports and the workers start (past the milliseconds that lose it)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    time.sleep(1)  # anything a worker would still print
    lines = [line for line in err_path.read_text().splitlines() if line.strip() and not line.startswith("grading")]
    assert lines == ["stopped"], err_path.read_text()
    assert not (tmp_path / "graded.jsonl").exists()
