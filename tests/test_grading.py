"""Answer extraction, equivalence and batch grading, checked against the benchmark golds."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

import distill.grading as grading
from distill.errors import DataError
from distill.grading import extract_answer, gold_answer, grade, grade_file, grade_records, is_correct, last_number
from distill.jsonl import read_jsonl

BENCH = Path(__file__).resolve().parents[1] / "data" / "benchmarks"

# 2^2^2^2^2^2 has ~10^19728 digits: sympy can only give up on it via math-verify's timeout.
TOWER = r"The answer is \boxed{2^{2^{2^{2^{2^{2}}}}}}"


@pytest.fixture(scope="module")
def math500() -> list[dict]:
    return read_jsonl(BENCH / "math500_test.jsonl")


@pytest.fixture(scope="module")
def gsm8k_test() -> list[dict]:
    return read_jsonl(BENCH / "gsm8k_test.jsonl")


# --- extraction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (r"First \boxed{3}, on reflection \boxed{4}.", "4"),
        (r"So $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\fbox{12}", "12"),
        (r"\boxed{$5$}", "5"),
        (r"<think>try \boxed{7}</think>So the result is \boxed{8}.", "8"),
        (r"<think>a</think><think>b \boxed{1}</think> The answer is 2.", "2"),
        ("<think>surely \\boxed{7}, I am still thinking", None),
        ("She makes 9 * 2 = $18.\n#### 18", "18"),
        ("#### 5\nwait\n#### 1,234\n", "1,234"),
        ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", r"\frac{3}{4}"),
        ("Adding up, the answer is 42.", "42"),
        ("The answer is: **3.5**", "3.5"),
        (r"\boxed{3} then a cut-off \boxed{\frac{1}{2", "3"),
        (r"\boxed{}", None),
        ("I cannot solve this.", None),
        ("", None),
    ],
)
def test_extract_answer(response: str, expected: str | None) -> None:
    assert extract_answer(response) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3 + 4 = <<3+4=7>>7 apples\n#### 1,234", "1234"),
        ("#### -5", "-5"),
        (r"so it is $\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),
        ("  1,000,000 ", "1000000"),
        ("1,2", "1,2"),  # a MATH answer listing two solutions, not one thousand-separated number
        (r" \text{(C)} ", r"\text{(C)}"),
    ],
)
def test_gold_answer(text: str, expected: str) -> None:
    assert gold_answer(text) == expected


# --- equivalence --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gold", "pred"),
    [
        ("0.5", "1/2"),
        ("1/2", "0.5"),
        (r"\frac{1}{2}", "0.5"),
        ("1234", "1,234"),
        ("1,234", "1234"),
        ("18", r"\$18"),
        ("18", r"18 \text{ dollars}"),
        (r"\frac{\pi}{2}", r"\pi/2"),
        (r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"5\sqrt{2}", r"\sqrt{50}"),
        ("-2,1", "1,-2"),
        (r"\text{(C)}", "C"),
        ("1/3", "0.333333"),
    ],
)
def test_equivalent(gold: str, pred: str) -> None:
    assert is_correct(gold, pred)


@pytest.mark.parametrize(
    ("gold", "pred"),
    [
        ("0.5", "0.6"),
        (r"\frac{1}{2}", r"\frac{1}{3}"),
        ("1234", "1,235"),
        ("18", "-18"),
        ("1/3", "0.33"),
        (r"\pi", "3.14159"),
        ("5", None),
        ("5", ""),
        ("", "5"),
    ],
)
def test_not_equivalent(gold: str, pred: str | None) -> None:
    assert not is_correct(gold, pred)


# --- batches ------------------------------------------------------------------------------


def test_grade_in_process_and_failure_isolation(monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = [("#### 7", "so \\boxed{7}"), ("#### 7", "blow up \\boxed{8}"), ("2", "no answer")]
    real = grading.is_correct

    def flaky(gold: str, pred: str | None) -> bool:
        if pred == "8":
            raise grading.TimeoutException("simulated")  # a BaseException, like the real one
        return real(gold, pred)

    monkeypatch.setattr(grading, "is_correct", flaky)
    assert grade(pairs, workers=1, progress=False) == [("7", True), ("8", False), (None, False)]


def test_grade_pool_matches_in_process(math500: list[dict], gsm8k_test: list[dict]) -> None:
    pairs = [(r["answer"], r["solution"]) for r in math500[:24]]
    pairs += [(r["answer"], r["answer"]) for r in gsm8k_test[:24]]
    pairs += [(math500[i]["answer"], math500[i + 1]["solution"]) for i in range(24, 34)]  # mostly wrong
    pairs += [("#### 3", "no final answer"), ("#### 3", "<think>\\boxed{3}")]
    serial = grade(pairs, workers=1, progress=False)
    pooled = grade(pairs, workers=2, progress=False, chunksize=4)
    assert pooled == serial
    assert [pred for pred, _ in serial[:24]] == [extract_answer(r["solution"]) for r in math500[:24]]
    assert sum(ok for _, ok in serial[:48]) == 48
    assert sum(ok for _, ok in serial[48:]) < 3
    assert serial[-2:] == [(None, False), (None, False)]


def test_timeout_in_worker_marks_item_wrong_not_batch() -> None:
    """The SIGALRM timeout must fire inside pool workers; one runaway item costs ~5 s, not the batch."""
    pairs = [("7", TOWER)] + [("#### 4", f"\\boxed{{{i % 5}}}") for i in range(40)]
    results = grade(pairs, workers=2, progress=False, chunksize=4)
    assert results[0] == ("2^{2^{2^{2^{2^{2}}}}}", False)
    assert [ok for _, ok in results[1:]] == [i % 5 == 4 for i in range(40)]


def test_grade_off_main_thread_uses_a_process() -> None:
    """In a thread math-verify cannot set SIGALRM; that must not turn right answers into wrong ones."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(grade([("0.5", r"\boxed{\frac12}")] * 3, progress=False)))
    t.start()
    t.join(timeout=60)
    assert out == [[(r"\frac12", True)] * 3]


def test_grade_records_adds_fields_without_mutating() -> None:
    records = [{"id": 1, "gold": 5.0, "response": "so\n#### 5"}, {"id": 2, "gold": "3", "response": "idk"}]
    graded = grade_records(records, workers=1, progress=False)
    assert graded == [
        {"id": 1, "gold": 5.0, "response": "so\n#### 5", "pred_answer": "5", "correct": True,
         "flexible_correct": True},
        {"id": 2, "gold": "3", "response": "idk", "pred_answer": None, "correct": False, "flexible_correct": False},
    ]
    assert "correct" not in records[0]


def test_the_flexible_rule_counts_the_last_number_only_where_the_strict_one_finds_no_answer() -> None:
    responses = {
        "She has 62 apples left.": (None, False, True),  # no marker: the last number, flexibly
        "The final answer is 62.": ("62", True, True),  # the phrase: strict
        "\\boxed{61}, or maybe 62": ("61", False, False),  # a wrong boxed answer stays wrong
        "<think>62": (None, False, False),  # cut off mid-thought: no answer at all
        "I counted 1,000 then 62, so 62.": (None, False, True),
        "no number here": (None, False, False),
    }
    graded = grade_records([{"gold": "62", "response": r} for r in responses], workers=1, progress=False)
    got = {g["response"]: (g["pred_answer"], g["correct"], g["flexible_correct"]) for g in graded}
    assert got == responses
    assert last_number("3.5 kg, then 1,234.") == "1234" and last_number("</think> -7 left") == "-7"


# --- files --------------------------------------------------------------------------------


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_grade_file(tmp_path: Path) -> None:
    rows = [
        {"q": "a", "answer": "#### 1,234", "out": r"<think>\boxed{1}</think> \boxed{1234}"},
        {"q": "b", "answer": r"\frac{1}{2}", "out": "The answer is 0.5."},
        {"q": "c", "answer": "7", "out": r"\boxed{8}"},
    ]
    src = _write_lines(tmp_path / "in.jsonl", [json.dumps(r) for r in rows[:2]] + ["", json.dumps(rows[2])])
    dst = tmp_path / "sub" / "graded.jsonl"
    summary = grade_file(src, dst, gold_field="answer", response_field="out", progress=False)
    assert summary == {"n": 3, "correct": 2, "accuracy": pytest.approx(2 / 3)}
    graded = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert [(g["q"], g["pred_answer"], g["correct"]) for g in graded] == [
        ("a", "1234", True),
        ("b", "0.5", True),
        ("c", "8", False),
    ]
    assert [{k: g[k] for k in ("q", "answer", "out")} for g in graded] == rows
    assert [p.name for p in dst.parent.iterdir()] == ["graded.jsonl"]  # no temp file left behind


def test_grade_file_empty(tmp_path: Path) -> None:
    src = _write_lines(tmp_path / "in.jsonl", [])
    assert grade_file(src, tmp_path / "out.jsonl", progress=False) == {"n": 0, "correct": 0, "accuracy": 0.0}
    assert (tmp_path / "out.jsonl").read_text() == ""


def test_grade_file_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"gold": "1", "response": r"\boxed{1}"})
    src = _write_lines(tmp_path / "in.jsonl", [good, "", '{"gold": "2", "response": '])
    with pytest.raises(DataError, match=rf"^{re.escape(str(src))}:3: malformed JSON"):
        grade_file(src, tmp_path / "out.jsonl", progress=False)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"gold": "1"}, "missing field 'response'"),
        ({"response": "x"}, "missing field 'gold'"),
        ({"gold": None, "response": "x"}, "field 'gold' must be a string or number"),
        ({"gold": "1", "response": ["x"]}, "field 'response' must be a string"),
    ],
)
def test_grade_file_bad_record_names_file_and_line(tmp_path: Path, bad: dict, message: str) -> None:
    good = json.dumps({"gold": "1", "response": r"\boxed{1}"})
    src = _write_lines(tmp_path / "in.jsonl", [good, "", "  ", good, json.dumps(bad)])
    with pytest.raises(DataError, match=rf"^{re.escape(str(src))}:5: {re.escape(message)}"):
        grade_file(src, tmp_path / "out.jsonl", progress=False)


# --- the benchmark golds grade themselves -------------------------------------------------


def test_math500_solutions_match_answers(math500: list[dict]) -> None:
    assert len(math500) == 500
    results = grade([(r["answer"], r["solution"]) for r in math500], workers=2, progress=False)
    wrong = [
        (r["unique_id"], r["answer"], pred) for r, (pred, ok) in zip(math500, results, strict=True) if not ok
    ]
    assert wrong == []


def test_gsm8k_rationales_match_their_final_answers(gsm8k_test: list[dict]) -> None:
    assert len(gsm8k_test) == 1319
    results = grade([(r["answer"], r["answer"]) for r in gsm8k_test], workers=2, progress=False)
    wrong = [
        (gold_answer(r["answer"]), pred) for r, (pred, ok) in zip(gsm8k_test, results, strict=True) if not ok
    ]
    assert wrong == []
    assert "," not in "".join(gold_answer(r["answer"]) for r in gsm8k_test)
