"""UNDO iterations: error mining, error-conditioned regeneration, the training-set policy."""

import json

import pytest

from distill import generation
from distill.config import load_config
from distill.generation import Completion
from distill.jsonl import read_jsonl, write_jsonl
from distill.layout import RunPaths
from distill.manifest import Manifest
from distill.problems import probe_problems
from distill.report import write_report
from distill.student import combine
from jobs.driver import main as driver_main
from tests.conftest import merge_stage_units, run_stage_unit


class ScriptedBackend:
    """Answers each prompt from a table keyed by question; records the prompts it saw."""

    tokenizer = None

    def __init__(self, answers: dict[str, str]):
        self.answers, self.prompts = answers, []

    def close(self):
        pass

    def generate(self, prompts, spec, seed):
        self.prompts += prompts
        out = []
        for p in prompts:
            question = p.split("Question: ", 1)[1].split("\n", 1)[0]
            out.append([Completion(self.answers[question], 5, True) for _ in range(spec.n)])
        return out


@pytest.fixture
def run(tiny_world, tmp_path, monkeypatch):
    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"),
                      ["undo.probe_split=validation", "undo.n=2", "generation.num_shards=1"])
    probe = probe_problems(cfg)
    return cfg, probe


def test_mining_collects_exactly_the_wrong_answers_with_the_previous_rationale(run, monkeypatch):
    cfg, probe = run
    paths = RunPaths(cfg.run_dir)
    wrong = {p["id"] for p in probe[::3]}
    answers = {p["question"]: f"\\boxed{{{int(p['gold']) + 1 if p['id'] in wrong else p['gold']}}}" for p in probe}
    monkeypatch.setattr(generation, "load_backend", lambda engine, path: ScriptedBackend(answers))
    paths.iteration(0).mkdir(parents=True)
    write_jsonl(paths.train_data(0), [{"problem_id": probe[0]["id"], "response": "old rationale", "question": "q"}])
    metrics = run_stage_unit(cfg, 1, "mine")
    errors = read_jsonl(paths.errors(1))
    assert {e["id"] for e in errors} == wrong and metrics["errors"] == len(wrong)
    by_id = {e["id"]: e for e in errors}
    first = by_id[probe[0]["id"]]
    assert first["student_answer"] == str(int(probe[0]["gold"]) + 1)
    assert first["previous"] == "old rationale"
    assert all(e["previous"] == "none" for e in errors if e["id"] != probe[0]["id"])
    assert metrics["probe_accuracy"] == pytest.approx(1 - len(wrong) / len(probe), abs=1e-4)


def test_regeneration_prompt_carries_the_students_answer(run, monkeypatch):
    cfg, probe = run
    paths = RunPaths(cfg.run_dir)
    paths.iteration(1).mkdir(parents=True)
    errors = [{"id": p["id"], "question": p["question"], "gold": p["gold"], "student_answer": "1234",
               "previous": "7*3=21. 10+21=31. \\boxed{31}", "verdict": "wrong"} for p in probe[:3]]
    write_jsonl(paths.errors(1), errors)
    teacher = ScriptedBackend({p["question"]: f"\\boxed{{{p['gold']}}}" for p in probe})
    monkeypatch.setattr(generation, "load_backend", lambda engine, path: teacher)
    run_stage_unit(cfg, 1, "generate", "0")
    assert len(teacher.prompts) == 3
    assert teacher.prompts[0] == (f"Question: {probe[0]['question']}\n"
                                  f"Previous answer: 7*3=21. 10+21=31. \\boxed{{31}}\n"
                                  "Student answer: 1234\nVerdict: wrong\nAnswer: ")
    assert merge_stage_units(cfg, 1, "generate")["records"] == 3 * 2  # undo.n samples per error


def test_unsolved_problems_are_recorded(run, monkeypatch):
    cfg, probe = run
    paths = RunPaths(cfg.run_dir)
    write_jsonl(paths.generations(1), [
        {"id": f"{p['id']}#0", "problem_id": p["id"], "question": p["question"], "gold": p["gold"],
         "response": f"\\boxed{{{p['gold'] if i else 999}}}", "n_tokens": 4} for i, p in enumerate(probe[:3])])
    metrics = run_stage_unit(cfg, 1, "verify")
    assert metrics["kept"] == 2 and metrics["problems_unsolved"] == 1
    assert [u["id"] for u in read_jsonl(paths.unsolved(1))] == [probe[0]["id"]]


def rec(pid, text):
    return {"problem_id": pid, "response": text}


def test_dataset_policy_dedups_caps_and_replaces():
    old = [rec("a", "x = 1"), rec("b", "y"), rec("b", "y2")]
    new = [rec("a", "x  =  1"), rec("a", "z"), rec("a", "w"), rec("c", "v")]
    acc = combine(new, old, "accumulate", cap=2)
    assert [(r["problem_id"], r["response"]) for r in acc] == [("a", "x  =  1"), ("a", "z"), ("c", "v"),
                                                               ("b", "y"), ("b", "y2")]
    rep = combine(new, old, "replace", cap=4)
    assert [(r["problem_id"], r["response"]) for r in rep] == [("a", "x  =  1"), ("a", "z"), ("a", "w"), ("c", "v"),
                                                               ("b", "y"), ("b", "y2")]
    assert [r["response"] for r in combine([], old, "replace", cap=1)] == ["x = 1", "y"]


def test_iteration_refuses_to_start_until_the_previous_one_is_done(tiny_world, tmp_path, capsys):
    cfg_path = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    m = Manifest(tmp_path / "runs" / "t")
    for stage in ("generate", "verify"):
        m.mark(0, stage, "done")
    assert driver_main(["--config", str(cfg_path), "--iter", "1"]) == 2
    err = capsys.readouterr().err
    assert (f"iteration 1 needs iteration 0 finished, but its train stage is pending: run `make iter ITER=0 "
            f"CONFIG={cfg_path}` first") in err
    assert Manifest(tmp_path / "runs" / "t").stage(1, "mine") == {}


def test_report_is_built_from_the_manifest(tmp_path):
    m = Manifest(tmp_path)
    res = lambda acc, tok: {"accuracy": acc, "tokens_mean": tok, "n": 100}  # noqa: E731
    m.mark(0, "train", "done", metrics={"step": 300, "examples": 900})
    m.mark(0, "verify", "done", metrics={"kept": 900, "problems_unsolved": 100})
    m.mark(0, "evaluate", "done",
           results={"teacher": res(0.9, 20.0), "base": {**res(0.0, 32.0), "flexible_accuracy": 0.12},
                    "student": res(0.4, 21.5)})
    m.mark(1, "mine", "done", metrics={"errors": 150})
    m.mark(1, "verify", "done", metrics={"kept": 260, "problems_unsolved": 20})
    m.mark(1, "train", "done", metrics={"step": 300, "examples": 1030})
    m.mark(1, "evaluate", "done", results={"student": res(0.5, 21.0)})
    m.mark(1, "baseline_train", "done", metrics={"step": 600, "examples": 900})
    m.mark(1, "baseline_evaluate", "done", results={"oneshot": res(0.45, 21.2)})
    m.mark(2, "mine", "running")
    path, table = write_report(tmp_path)
    lines = table.splitlines()
    assert lines[2] == "| teacher | - | 90.0% | - | - | - | - | - | - | 20.0 |"
    assert lines[3] == "| student (untrained) | - | 0.0% | 12.0% | - | - | - | - | - | 32.0 |"  # flexible beside
    assert lines[4] == "| student (distilled) | 0 | 40.0% | - | 900 | - | 900 | 100 | 300 | 21.5 |"
    assert lines[5] == "| student (UNDO) | 1 | 50.0% | - | 1030 | 150 | 260 | 20 | 600 | 21.0 |"
    assert lines[6] == "| one-shot (same steps) | 1 | 45.0% | - | 900 | - | - | - | 600 | 21.2 |"
    assert len(lines) == 7
    data = json.loads((tmp_path / "report.json").read_text())
    assert [r["accuracy"] for r in data["rows"]] == [0.9, 0.0, 0.4, 0.5, 0.45]
    assert (tmp_path / "report.png").stat().st_size > 1000 and table in path.read_text()
