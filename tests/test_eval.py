"""Standalone benchmark evaluation: shards, resume, grading, and a report whose numbers are
recomputed here from the graded records; chat-template prompts."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest

from distill import evaluation, generation
from distill.__main__ import main
from distill.benchmarks import load_benchmark
from distill.config import PromptConfig
from distill.evaluation import EvalSettings, run_eval
from distill.generation import Completion
from distill.jsonl import read_jsonl
from distill.prompts import build_prompt
from tests.conftest import run_python

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


class ScriptedBackend:
    """Answers every other problem right, Qwen-style: a boxed draft inside <think>, then the answer."""

    tokenizer = None

    def __init__(self, problems, shift=0):
        self.index = {p["question"]: (i, p["gold"]) for i, p in enumerate(problems)}
        self.shift, self.prompts = shift, []

    def close(self):
        pass

    def generate(self, prompts, spec, seed):
        self.prompts += prompts
        out = []
        for prompt in prompts:
            i, gold = self.index[prompt.split("Question: ", 1)[1].rsplit("\nAnswer: ", 1)[0]]
            right = (i + self.shift) % 2 == 0
            answer = gold if right else "-12345"
            out.append([Completion(f"<think>maybe \\boxed{{-1}}</think> So \\boxed{{{answer}}}.", 5 + 3 * i, right)])
        return out


def test_report_numbers_match_the_graded_records(tmp_path, monkeypatch):
    problems = load_benchmark("math500", limit=12)
    backends = {"teacher": ScriptedBackend(problems), "student": ScriptedBackend(problems, shift=1)}
    monkeypatch.setattr(generation, "load_backend", lambda engine, path: backends[path])
    settings = EvalSettings(source="math500", limit=12, max_new_tokens=64, num_shards=3)
    models = {"teacher": "teacher", "student": "student"}
    out = tmp_path / "eval"
    assert run_eval(settings, models, out, shards=[1], workers=1, progress=False) is None  # one shard: no report
    assert not (out / "tokens.json").exists()
    summaries = run_eval(settings, models, out, workers=1, progress=False)
    report = json.loads((out / "tokens.json").read_text())
    assert report["models"] == summaries
    for label in models:
        graded = read_jsonl(out / label / "graded.jsonl")
        assert [r["problem_id"] for r in graded] == [p["id"] for p in problems]
        assert all(r["meta"] == p["meta"] for r, p in zip(graded, problems, strict=True))
        correct = [r for r in graded if r["correct"]]
        tokens = [r["n_tokens"] for r in graded]
        s = report["models"][label]
        assert (s["n"], s["correct"], s["accuracy"]) == (12, len(correct), round(len(correct) / 12, 4))
        assert s["tokens_mean"] == round(statistics.fmean(tokens), 2) and s["tokens_max"] == max(tokens)
        assert s["tokens_median"] == statistics.median(tokens)
        assert s["correct_tokens_mean"] == round(statistics.fmean(r["n_tokens"] for r in correct), 2)
        for field in ("subject", "level"):
            for value, g in s["by"][field].items():
                members = [r for r in graded if str(r["meta"][field]) == value]
                assert (g["n"], g["correct"]) == (len(members), sum(r["correct"] for r in members))
        metrics = json.loads((out / label / "metrics.json").read_text())
        assert metrics["accuracy"] == s["accuracy"] and metrics["grading_answers_per_s"] > 0
    # answers after </think> count: every other problem right, the drafts inside <think> ignored
    assert report["models"]["teacher"]["correct"] == 6 and report["models"]["student"]["correct"] == 6
    md = (out / "tokens.md").read_text()
    assert "| teacher | 12 | 50.0% |" in md and "### by subject" in md and "### by level" in md
    assert (out / "tokens.png").read_bytes()[:4] == b"\x89PNG"
    # a finished directory is not generated again, and other settings are refused
    backends["teacher"].prompts.clear()
    run_eval(settings, models, out, workers=1, progress=False)
    assert backends["teacher"].prompts == []
    with pytest.raises(evaluation.DistillError, match="limit differ"):
        run_eval(EvalSettings(source="math500", limit=11, max_new_tokens=64, num_shards=3), models, out)


def test_cli_on_a_tiny_model_by_shard_then_merged_and_resumed(tiny_world, tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["eval", "--bench", "svamp", "--model", f"tiny={tiny_world.teacher}", "--limit", "6",
            "--max-new-tokens", "6", "--num-shards", "2", "--out", str(out), "--quiet"]
    # one shard in its own process, as an array task would run it
    first = run_python(f"import sys; from distill.__main__ import main; sys.exit(main({args + ['--shard', '1']!r}))",
                       timeout=300)
    assert first.returncode == 0, first.stderr
    assert "shard(s) [1] done" in first.stdout and not (out / "tiny" / "shard-00000-of-00002.jsonl").exists()
    assert main(args) == 0
    assert "| tiny | 6 |" in capsys.readouterr().out
    graded = read_jsonl(out / "tiny" / "graded.jsonl")
    assert len(graded) == 6 and all(r["meta"]["type"] for r in graded) and all(r["n_tokens"] <= 6 for r in graded)
    report = json.loads((out / "tokens.json").read_text())["models"]["tiny"]
    assert report["correct"] == sum(r["correct"] for r in graded) and report["by"]["type"]
    before = {p: p.stat().st_mtime_ns for p in (out / "tiny").glob("shard-*")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "tiny").glob("shard-*")} == before
    capsys.readouterr()
    assert main(["eval", "--bench", "svamp", "--data", "x.jsonl", "--model", str(tiny_world.teacher)]) == 2
    assert capsys.readouterr().err.strip() == "error: eval: give exactly one of --bench NAME or --data PATH"


def test_user_file_with_column_mapping_through_the_cli(tiny_world, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"prompt": "Tom has 3 pens. How many?", "solution": "3", "kind": "count"}\n')
    out = tmp_path / "ev"
    assert main(["eval", "--data", str(data), "--prompt_col", "prompt", "--answer_col", "solution",
                 "--meta-col", "kind",
                 "--model", str(tiny_world.student), "--max-new-tokens", "4", "--out", str(out), "--quiet"]) == 0
    (record,) = read_jsonl(out / "student" / "graded.jsonl")
    assert record["gold"] == "3" and record["meta"] == {"kind": "count"}
    assert record["prompt"] == "Question: Tom has 3 pens. How many?\nAnswer: "


def test_prompts_use_the_tokenizers_chat_template(tiny_world, tmp_path):
    from transformers import AutoTokenizer

    model = tmp_path / "chat-model"
    shutil.copytree(tiny_world.teacher, model)
    tok = AutoTokenizer.from_pretrained(str(model))
    assert not tok.chat_template
    assert build_prompt(tok, PromptConfig(), "1+1?") == "Question: 1+1?\nAnswer: "
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(model))
    expected = "<|user|>Question: 1+1?\nAnswer: <|end|><|assistant|>"
    assert build_prompt(tok, PromptConfig(), "1+1?") == expected
    assert build_prompt(tok, PromptConfig(use_chat_template=False), "1+1?") == "Question: 1+1?\nAnswer: "
    # end to end: the saved template is what the eval's backend applies
    run_eval(EvalSettings(source="gsm8k", limit=2, max_new_tokens=3), {"chat": str(model)}, tmp_path / "ev",
             workers=1, progress=False)
    records = read_jsonl(tmp_path / "ev" / "chat" / "graded.jsonl")
    question = load_benchmark("gsm8k", limit=1)[0]["question"]
    assert records[0]["prompt"] == f"<|user|>Question: {question}\nAnswer: <|end|><|assistant|>"
