"""Token efficiency: the `<= median tokens` filter, summaries by group, the token report."""

from __future__ import annotations

import pytest

from distill.config import load_config
from distill.efficiency import filter_rationales, summarize, write_token_report
from distill.jsonl import read_jsonl, write_jsonl
from distill.layout import RunPaths
from distill.runner import open_run
from tests.conftest import run_stage_unit


def _rec(pid: str, k: int, n_tokens: int, correct: bool = True, **meta) -> dict:
    return {"id": f"{pid}#{k}", "problem_id": pid, "n_tokens": n_tokens, "correct": correct, "finished": True,
            **({"meta": meta} if meta else {})}


RECORDS = [_rec("a", 0, 10), _rec("a", 1, 40), _rec("b", 0, 60), _rec("b", 1, 80), _rec("b", 2, 20)]


def test_median_filters_global_and_per_problem():
    kept, threshold = filter_rationales(RECORDS, "median_tokens")
    assert threshold == 40.0 and [r["id"] for r in kept] == ["a#0", "a#1", "b#2"]
    kept, threshold = filter_rationales(RECORDS, "problem_median_tokens")  # a: 25, b: 60
    assert threshold is None and [r["id"] for r in kept] == ["a#0", "b#0", "b#2"]
    assert filter_rationales(RECORDS, "none") == (RECORDS, None)
    assert filter_rationales([], "median_tokens") == ([], None)
    with pytest.raises(ValueError, match="unknown filter"):
        filter_rationales(RECORDS, "shortest")


def test_verify_stage_applies_the_configured_filter(tiny_world, tmp_path):
    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"), ["verify.filter=median_tokens"])
    paths, _ = open_run(cfg)
    right, wrong = "So \\boxed{5}.", "So \\boxed{6}."
    gens = [{"id": f"p{i}#0", "problem_id": f"p{i}", "question": f"q{i}", "gold": "5",
             "response": right if i < 4 else wrong, "n_tokens": 10 * (i + 1), "finished": True} for i in range(6)]
    write_jsonl(paths.generations(0), gens)
    metrics = run_stage_unit(cfg, 0, "verify")
    assert [r["id"] for r in read_jsonl(RunPaths(cfg.run_dir).verified(0))] == ["p0#0", "p1#0"]
    assert metrics["correct"] == 4 and metrics["kept"] == 2 and metrics["filter_threshold"] == 25.0
    assert metrics["teacher_accuracy"] == round(4 / 6, 4) and metrics["problems_solved"] == 4
    assert metrics["kept_tokens_max"] == 20


def test_summary_groups_by_metadata_and_splits_lengths_by_correctness():
    records = [_rec("a", 0, 10, True, level=2, subject="Algebra"), _rec("b", 0, 30, False, level=10, subject="Algebra"),
               _rec("c", 0, 20, True, level=2, subject="Geometry")]
    s = summarize(records)
    assert (s["n"], s["correct"], s["accuracy"]) == (3, 2, 0.6667)
    assert (s["tokens_mean"], s["tokens_median"], s["tokens_max"]) == (20.0, 20.0, 30)
    assert (s["correct_tokens_mean"], s["incorrect_tokens_mean"], s["incorrect_tokens_max"]) == (15.0, 30.0, 30)
    assert list(s["by"]["level"]) == ["2", "10"]  # numeric order
    assert s["by"]["level"]["2"] == {"n": 2, "correct": 2, "accuracy": 1.0, "tokens_mean": 15.0}
    assert s["by"]["subject"]["Algebra"]["accuracy"] == 0.5


def test_token_report_table_and_png(tmp_path):
    md, table = write_token_report({"teacher": RECORDS, "student": [_rec("a", 0, 5, False)]}, tmp_path, "t")
    assert "| teacher | 5 | 100.0% | 100.0% | 42.0 | 40.0 | 80 |" in table
    assert "| student | 1 | 0.0% | 0.0% | 5.0 |" in table
    assert (tmp_path / "tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![response tokens" in md.read_text()


def test_tokens_command_reports_a_runs_evaluated_models(tmp_path, capsys):
    from distill.__main__ import main

    paths = RunPaths(tmp_path / "run")
    for label, recs in (("student", [_rec("a", 0, 7)]), ("teacher", RECORDS), ("base", [_rec("a", 0, 9, False)])):
        write_jsonl(paths.eval(0, 1).graded(label), recs)
    assert main(["tokens", "--run", str(paths.root)]) == 0
    out = capsys.readouterr().out
    assert out.index("| teacher |") < out.index("| base |") < out.index("| student |")
    assert (paths.iteration(0) / "tokens.png").exists() and (paths.iteration(0) / "tokens.md").exists()
    assert main(["tokens", "--run", str(paths.root), "--iter", "1"]) == 2


def test_a_model_with_no_correct_answer_has_no_correct_lengths():
    from distill.efficiency import comparison_table

    s = summarize([_rec("a", 0, 7, False), _rec("b", 0, 9, False)])
    assert ((s["accuracy"], s["tokens_mean"], s["correct_tokens_mean"], s["correct_tokens_max"])
            == (0.0, 8.0, None, None))
    assert "| wrong | 2 | 0.0% | 0.0% | 8.0 | 8.0 | 9 | - | 8.0 | 0 |" in comparison_table({"wrong": s})
    flexible = summarize([{**_rec("a", 0, 7, False), "flexible_correct": True}, _rec("b", 0, 9, False)])
    assert (flexible["accuracy"], flexible["flexible_accuracy"]) == (0.0, 0.5)  # the last number counted once
