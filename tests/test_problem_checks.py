"""Malformed problems are refused in one line naming the file, the line (or array index) and the
field, on the login node: a question or gold that is not text, and a gold whose final answer
grading could not find. A huge value is never quoted whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distill.config import DataConfig, load_config
from distill.errors import DataError
from distill.preflight import check_inputs
from distill.problems import load_problems
from jobs.driver import Driver
from jobs.driver import main as driver_main
from tests.test_driver import snapshot

BENCH = Path(__file__).resolve().parents[1] / "data" / "benchmarks"
GSM8K_RATIONALE = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                   "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.")
MATH_SOLUTION = ("We have $f(-2) = 5(-2)^2 + 3(-2) + 4 = 5(4) - 6 + 4 = 18$, and so on, until the sum "
                 "of all three values comes out as $18$.")


def _jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _with(at: int, **fields: Any) -> list[dict[str, Any]]:
    """Four good records; record `at` (0-based) with `fields` replaced."""
    records = [{"id": f"p{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
    records[at] = records[at] | fields
    return records


def _check(tiny_world: Any, tmp_path: Path, train: Path, *sets: str) -> list[str]:
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    return check_inputs(load_config(cfg, [f"data.train={train}", *sets]))


NOT_TEXT = {
    "null question": ({"question": None}, "field 'question': expected a non-empty string or a number, got null"),
    "empty question": ({"question": ""}, "field 'question' is empty"),
    "blank question": ({"question": "  \n"}, "field 'question' is empty"),
    "list question": ({"question": ["What is 2 + 2?"]},
                      "field 'question': expected a non-empty string or a number, got a list ['What is 2 + 2?']"),
    "null gold": ({"answer": None}, "field 'answer': expected a non-empty string or a number, got null"),
    "empty gold": ({"answer": ""}, "field 'answer' is empty"),
    "list gold": ({"answer": ["7"]}, "field 'answer': expected a non-empty string or a number, got a list ['7']"),
    "object gold": ({"answer": {"value": 7}},
                    "field 'answer': expected a non-empty string or a number, got an object {'value': 7}"),
    "boolean gold": ({"answer": True}, "field 'answer': expected a non-empty string or a number, got a boolean (true)"),
    "NaN gold": ({"answer": float("nan")}, "field 'answer': expected a finite number, got nan"),
}


@pytest.mark.parametrize("case", NOT_TEXT)
def test_a_question_or_gold_that_is_not_text_is_refused_naming_line_and_field(case, tmp_path, tiny_world):
    fields, message = NOT_TEXT[case]
    train = _jsonl(tmp_path / "train.jsonl", _with(2, **fields))
    with pytest.raises(DataError) as exc:
        _check(tiny_world, tmp_path, train)
    assert str(exc.value) == f"{train}:3: {message}"


def test_a_json_array_names_the_index(tmp_path):
    train = tmp_path / "train.json"
    train.write_text(json.dumps(_with(1, answer=None)))
    with pytest.raises(DataError) as exc:
        load_problems(DataConfig(train=str(train)), "train")
    assert str(exc.value) == f"{train}[1]: field 'answer': expected a non-empty string or a number, got null"


def test_the_mapped_field_is_the_one_named(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"q": "1+1?", "sol": ["2"]}])
    expected = rf"^{train}:1: field 'sol': expected a non-empty string or a number, got a list"
    with pytest.raises(DataError, match=expected):
        load_problems(DataConfig(train=str(train), question_field="q", answer_field="sol"), "train")


def _cut(value: str) -> str:
    """How an error line quotes a long value: its first 80 characters as Python writes it."""
    return f"{repr(value)[:80]}… ({len(value)} characters)"


NO_FINAL = ("field 'answer': no final answer to grade against (neither a '#### n' line nor \\boxed{...}, and not "
            "a plain answer of one line up to 100 characters): ")
UNGRADABLE = {
    "GSM8K rationale without its #### line": (GSM8K_RATIONALE, NO_FINAL + _cut(GSM8K_RATIONALE)),
    "MATH solution without \\boxed": (MATH_SOLUTION, NO_FINAL + _cut(MATH_SOLUTION)),
    "empty \\boxed{}": ("So the answer is \\boxed{}.",
                        "field 'answer': its final answer is empty: 'So the answer is \\\\boxed{}.'"),
    "empty #### line": ("2 + 2 = 4\n####  ", "field 'answer': its final answer is empty: '2 + 2 = 4\\n####  '"),
}


@pytest.mark.parametrize("case", UNGRADABLE)
def test_a_gold_without_a_final_answer_is_refused(case, tmp_path, tiny_world):
    gold, message = UNGRADABLE[case]
    train = _jsonl(tmp_path / "train.jsonl", _with(3, answer=gold))
    with pytest.raises(DataError) as exc:
        _check(tiny_world, tmp_path, train)
    assert str(exc.value).startswith(f"{train}:4: {message}"), str(exc.value)
    if "no final answer" in message:
        assert str(exc.value).endswith("; set data.answer_field to a field holding the bare answer")


def test_a_solution_field_is_refused_until_the_answer_field_is_mapped(tmp_path, tiny_world):
    """MATH-style records: the solution has no \\boxed{}, the answer field holds the bare answer."""
    records = [{"id": "m0", "problem": "Find f(-2).", "solution": MATH_SOLUTION, "answer": "18"}]
    train = _jsonl(tmp_path / "train.jsonl", records)
    sets = ["data.question_field=problem", f"data.test={train}"]
    with pytest.raises(DataError, match=rf"^{train}:1: field 'solution': no final answer to grade against"):
        _check(tiny_world, tmp_path, train, *sets, "data.answer_field=solution")
    notes = _check(tiny_world, tmp_path, train, *sets, "data.answer_field=answer")
    assert [n.split(" (")[0] for n in notes] == ["data.train: 1 of 1 problems are near-copies of a data.test problem"]


GRADABLE = {
    "integer gold": ({"question": "q?", "answer": 12}, "q?", "12"),
    "integral float gold": ({"question": "q?", "answer": 27.0}, "q?", "27"),
    "float gold": ({"question": "q?", "answer": 2.5}, "q?", "2.5"),
    "numeric question": ({"question": 7, "answer": "2"}, "7", "2"),
    "plain LaTeX": ({"question": "q?", "answer": "\\begin{pmatrix} 16/49 \\\\ 48/49 \\end{pmatrix}"}, "q?",
                    "\\begin{pmatrix} 16/49 \\\\ 48/49 \\end{pmatrix}"),
    "plain text": ({"question": "q?", "answer": "\\text{Navin}"}, "q?", "\\text{Navin}"),
    "GSM8K rationale": ({"question": "q?", "answer": GSM8K_RATIONALE + "\n#### 72"}, "q?",
                        GSM8K_RATIONALE + "\n#### 72"),
    "MATH solution": ({"question": "q?", "answer": MATH_SOLUTION + " It is $\\boxed{18}$."}, "q?",
                      MATH_SOLUTION + " It is $\\boxed{18}$."),
}


@pytest.mark.parametrize("case", GRADABLE)
def test_numbers_plain_answers_and_marked_solutions_are_kept(case, tmp_path):
    record, question, gold = GRADABLE[case]
    train = _jsonl(tmp_path / "train.jsonl", [record])
    problem = load_problems(DataConfig(train=str(train)), "train")[0]
    assert (problem["question"], problem["gold"]) == (question, gold)


@pytest.mark.parametrize(("file", "question", "answer"), [
    ("gsm8k_train.jsonl", "question", "answer"),
    ("math500_test.jsonl", "problem", "answer"),
    ("math500_test.jsonl", "problem", "solution"),
    ("svamp.json", "Question", "Answer"),
])
def test_the_benchmark_files_read_as_user_files_pass(file, question, answer):
    data = DataConfig(train=str(BENCH / file), question_field=question, answer_field=answer, id_field=None)
    assert len(load_problems(data, "train")) > 400


def test_a_five_megabyte_gold_is_quoted_in_80_characters(tmp_path, tiny_world, monkeypatch, capsys):
    train = _jsonl(tmp_path / "train.jsonl", _with(1, answer="7 " * 2_500_000))
    with pytest.raises(DataError) as exc:
        _check(tiny_world, tmp_path, train)
    message = str(exc.value)
    assert message.startswith(f"{train}:2: field 'answer': no final answer to grade against")
    assert message.endswith(f": {_cut('7 ' * 2_500_000)}; set data.answer_field to a field holding the bare answer")
    assert len(message) < len(str(train)) + 400

    # The same line from the driver, before it submits anything.
    monkeypatch.setattr(Driver, "run_iteration", lambda *a, **k: pytest.fail("submitted past bad data"))
    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    assert driver_main(["--config", str(cfg), "--executor", "local", "--set", f"data.train={train}"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"
    assert snapshot(tmp_path / "runs") == {}


def test_a_huge_duplicate_id_is_quoted_in_80_characters(tmp_path):
    huge = "x" * 1_000_000
    train = _jsonl(tmp_path / "train.jsonl", [{"id": huge, "question": "a", "answer": "1"},
                                               {"id": huge, "question": "b", "answer": "2"}])
    with pytest.raises(DataError) as exc:
        load_problems(DataConfig(train=str(train)), "train")
    assert str(exc.value) == f"{train}:2: duplicate id {_cut(huge)} (first at {train}:1)"
