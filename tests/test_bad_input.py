"""Bad input: one line naming the file and the place, a non-zero exit, completed work untouched."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill.config import load_config
from distill.errors import DataError
from distill.manifest import Manifest
from distill.preflight import check_inputs
from distill.problems import eval_problems, train_problems
from jobs.driver import Driver
from jobs.driver import main as driver_main
from jobs.sbatch import main as stage_main
from tests.conftest import ROOT
from tests.test_driver import snapshot


def _rewrite(src: Path, dest: Path, edit) -> Path:
    rows = src.read_text().splitlines()
    dest.write_text("".join(line + "\n" for line in edit(rows)))
    return dest


def _drop_answer(rows: list[str]) -> list[str]:
    record = json.loads(rows[6])
    del record["answer"]
    return rows[:6] + [json.dumps(record)] + rows[7:]


def _one_long_question(rows: list[str], at: int = 2, chars: int = 1_000_000) -> list[str]:
    record = json.loads(rows[at])
    record["question"] = "x" * chars
    return rows[:at] + [json.dumps(record)] + rows[at + 1:]


# name -> (how to break the input: (tmp_path, config path, train file) -> extra driver args, expected message)
CASES = {
    "malformed JSONL": (lambda tmp, cfg, train:
                        ["--set",
                         f"data.train={_rewrite(train, tmp / 'bad.jsonl', lambda r: r[:4] + [r[4][:-5]] + r[5:])}"],
                        "{tmp}/bad.jsonl:5: malformed JSON"),
    "empty dataset": (lambda tmp, cfg, train:
                      ["--set", f"data.train={_rewrite(train, tmp / 'empty.jsonl', lambda r: [])}"],
                      "{tmp}/empty.jsonl: no problems in file"),
    "missing answer field": (lambda tmp, cfg, train:
                             ["--set", f"data.train={_rewrite(train, tmp / 'noans.jsonl', _drop_answer)}"],
                             "{tmp}/noans.jsonl:7: missing field 'answer'"),
    "question too long": (lambda tmp, cfg, train:
                          ["--set", f"data.train={_rewrite(train, tmp / 'long.jsonl', _one_long_question)}"],
                          "{tmp}/long.jsonl:3: question longer than data.max_question_chars (8000 characters), 1 such "
                          "in data.train; raise data.max_question_chars or set data.too_long: skip to leave them out"),
    "unknown config key": (lambda tmp, cfg, train:
                           cfg.write_text(cfg.read_text().replace("  num_shards: 2", "  num_shard: 2", 1)) and [],
                           "{cfg}: generation.num_shard: unknown key (expected one of: backend, n,"),
    "wrong type": (lambda tmp, cfg, train: cfg.write_text(cfg.read_text().replace("lr: 0.001", "lr: fast")) and [],
                   "{cfg}: train.lr: expected float, got 'fast'"),
    "missing model path": (lambda tmp, cfg, train: ["--set", f"models.student={tmp / 'no-such-model'}"],
                           "{cfg}: models.student: path not found: {tmp}/no-such-model"),
    "unwritable run directory": (lambda tmp, cfg, train: ["--set", f"run_root={cfg}/runs"],
                                 "{cfg}: run_root: cannot create the run directory {cfg}/runs/t: "
                                 "{cfg} is not a directory"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_in_one_line_before_anything_changes(case, tmp_path, tiny_world, capsys):
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    (tmp_path / "runs" / "t").mkdir(parents=True)
    (tmp_path / "runs" / "t" / "keep.txt").write_text("earlier results")
    break_input, message = CASES[case]
    args = break_input(tmp_path, cfg, tiny_world.data / "train.jsonl")
    before = snapshot(tmp_path / "runs")
    assert driver_main(["--config", str(cfg), "--executor", "local", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(tmp=tmp_path, cfg=cfg)), err
    assert err.count("\n") == 1
    assert snapshot(tmp_path / "runs") == before


def test_shard_cut_mid_line_is_named_then_redone(tmp_path, tiny_world, capsys):
    """A finished shard damaged before the merge: the merge names the line and refuses; the
    shard is marked failed, and running it again keeps its complete records and redoes the rest."""
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    common = ["--config", str(cfg), "--iter", "0", "--set", "data.train_limit=16"]
    for shard in ("0", "1"):
        assert stage_main(["generate", *common, "--shard", shard]) == 0
    run = tmp_path / "runs" / "t"
    shard1 = run / "iter-0" / "generate" / "shard-00001-of-00002.jsonl"
    shard0_text = (run / "iter-0" / "generate" / "shard-00000-of-00002.jsonl").read_text()
    full = shard1.read_text()
    lines = full.splitlines(keepends=True)
    assert len(lines) == 8
    shard1.write_text("".join(lines[:5]) + lines[5][:20])
    capsys.readouterr()

    assert stage_main(["merge", "generate", *common]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {shard1}:6: last line cut short mid-record (an interrupted write?); "
                   "generate shard 1 is marked failed: run again to redo it\n")
    assert not (run / "iter-0" / "generations.jsonl").exists()
    assert Manifest(run).stage(0, "generate")["shards"]["1"]["state"] == "failed"

    assert stage_main(["generate", *common, "--shard", "1"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["generated_records"] == 3  # lines 6-8 only
    assert shard1.read_text() == full
    assert (run / "iter-0" / "generate" / "shard-00000-of-00002.jsonl").read_text() == shard0_text
    assert stage_main(["merge", "generate", *common]) == 0
    merged = [json.loads(line)["id"] for line in (run / "iter-0" / "generations.jsonl").read_text().splitlines()]
    assert len(merged) == len(set(merged)) == 16


def test_too_long_questions_are_counted_and_named_by_the_first(tmp_path, tiny_world):
    long_at = lambda rows: _one_long_question(_one_long_question(rows, 5, 9000), 2, 8001)  # noqa: E731
    train = _rewrite(tiny_world.data / "train.jsonl", tmp_path / "long.jsonl", long_at)
    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"), [f"data.train={train}"])
    with pytest.raises(DataError, match=rf"^{tmp_path}/long.jsonl:3: question longer .* 2 such in data.train;"):
        check_inputs(cfg)
    # Only the problems a run reads count: the first two are short.
    cfg = load_config(cfg.source, [f"data.train={train}", "data.train_limit=2"])
    assert check_inputs(cfg) == []
    cfg = load_config(cfg.source, [f"data.train={train}", "data.max_question_chars=9000"])
    assert check_inputs(cfg) == []


def test_skip_leaves_long_questions_out_of_every_job_and_says_how_many(tmp_path, tiny_world, monkeypatch, capsys):
    train = _rewrite(tiny_world.data / "train.jsonl", tmp_path / "long.jsonl", _one_long_question)
    test = _rewrite(tiny_world.data / "test.jsonl", tmp_path / "test.jsonl", _one_long_question)
    path = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    sets = [f"data.train={train}", f"data.test={test}", "data.too_long=skip", "data.train_limit=10"]
    cfg = load_config(path, sets)
    every = [json.loads(line)["id"] for line in train.read_text().splitlines()]
    ids = [p["id"] for p in train_problems(cfg)]
    assert ids == every[:2] + every[3:11]  # left out; the limit counts the problems kept
    assert "test-00002" not in [p["id"] for p in eval_problems(cfg)]
    assert check_inputs(cfg) == [
        f"data.train: left out 1 problem(s) whose question is longer than data.max_question_chars (8000 "
        f"characters), the first at {tmp_path}/long.jsonl:3",
        f"data.test: left out 1 problem(s) whose question is longer than data.max_question_chars (8000 "
        f"characters), the first at {tmp_path}/test.jsonl:3",
    ]
    # The driver says so once, before any stage runs.
    monkeypatch.setattr(Driver, "run_iteration", lambda self, iteration, only=None: True)
    args = ["--config", str(path), "--executor", "local"] + [a for s in sets for a in ("--set", s)]
    assert driver_main(args) == 0
    out = capsys.readouterr().out
    assert out.count("left out 1 problem(s)") == 2 and f"the first at {tmp_path}/long.jsonl:3" in out


def test_a_file_of_only_long_questions_says_so(tmp_path, tiny_world):
    train = tmp_path / "all-long.jsonl"
    train.write_text(json.dumps({"question": "x" * 20, "answer": "1"}) + "\n")
    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"),
                      [f"data.train={train}", "data.too_long=skip", "data.max_question_chars=10"])
    with pytest.raises(DataError, match=r"no problems in file \(all 1 longer than data.max_question_chars\)$"):
        check_inputs(cfg)


# Every command line that takes `--set` (or, for `distill eval`, its `key=value` flag).
CLIS = {
    "driver": ["-m", "jobs.driver", "--config", "{cfg}", "--executor", "local"],
    "stage generate": ["-m", "jobs.sbatch", "generate", "--config", "{cfg}", "--iter", "0", "--shard", "0"],
    "stage merge": ["-m", "jobs.sbatch", "merge", "generate", "--config", "{cfg}", "--iter", "0"],
    "stage count": ["-m", "jobs.sbatch", "count", "evaluate", "--config", "{cfg}", "--iter", "0"],
    "distill compare": ["-m", "distill", "compare", "--config", "{cfg}", "--quiet"],
    "distill eval": ["-m", "distill", "eval", "--bench", "gsm8k", "--model", "m", "--out", "{tmp}/eval"],
}
BAD_SETS = {
    "train.lr=[1,": "not valid YAML (expected the node content, but found '<stream end>')",
    "train.lr=!!int x": "not valid YAML (invalid literal for int() with base 10: 'x')",
    "train.nope=1": "train.nope: unknown key (expected one of: objective, lr,",
    "train.lr": "expected key.path=value",
}


@pytest.mark.parametrize("cli, item", [(cli, item) for cli in CLIS for item in BAD_SETS
                                       if not (cli == "distill eval" and item == "train.nope=1")])  # any key goes there
def test_a_bad_set_is_one_line_and_exit_2_from_every_command_line(cli, item, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: t\nrun_root: {tmp_path}/runs\nmodels: {{teacher: m/t, student: m/s}}\n"
                   "data: {train: d/train.jsonl, test: d/test.jsonl}\n")
    args = [a.format(cfg=cfg, tmp=tmp_path) for a in CLIS[cli]]
    flag = "--chat-template-arg" if cli == "distill eval" else "--set"
    out = subprocess.run([sys.executable, *args, flag, item], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"error: {flag} {item}: {BAD_SETS[item]}"), out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


# Numbers on the command line: a negative iteration or shard, zero workers.
BAD_NUMBERS = {
    "driver": (["--iter", "-1"], "argument --iter: must be >= 0, got -1"),
    "stage generate": (["--shard", "-2"], "argument --shard: must be >= 0, got -2"),
    "distill eval": (["--workers", "0"], "argument --workers: must be >= 1, got 0"),
    "distill compare": (["--steps", "many"], "argument --steps: expected a whole number, got 'many'"),
}


@pytest.mark.parametrize("cli", BAD_NUMBERS)
def test_a_bad_number_on_the_command_line_is_a_usage_error_before_anything_runs(cli, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: t\nrun_root: {tmp_path}/runs\nmodels: {{teacher: m/t, student: m/s}}\n"
                   "data: {train: d/train.jsonl, test: d/test.jsonl}\n")
    extra, said = BAD_NUMBERS[cli]
    args = [a.format(cfg=cfg, tmp=tmp_path) for a in CLIS[cli]] + extra
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.splitlines()[-1].endswith(f"error: {said}"), out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "runs").exists()
