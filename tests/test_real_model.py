"""A real pretrained model through the loop: SmolLM2-135M-Instruct (`make real-model`) on SVAMP.

The demo's models are built here and share a toy tokenizer, so what only a real checkpoint
exercises is checked on this one: its chat template applied once, its end-of-turn token ending
generation, left padding for generation, answers extracted from real prose, and the training
data surviving a tokenizer round trip. The run is the example config cut to 32 training and 12
test problems and a few steps, through the driver and the local executor (each stage a process
of its own, as a job). Its precision is the example's `auto`, float32 on a CPU: where bf16 is
emulated it is about 5 times slower."""

from __future__ import annotations

import json

import pytest

from distill.config import load_config
from distill.jsonl import read_jsonl
from distill.layout import RunPaths
from jobs.driver import main as driver_main
from tests.conftest import ROOT

pytestmark = pytest.mark.real
CONFIG = ROOT / "configs" / "examples" / "smollm2-selfdistill-cpu.yaml"
MODEL = ROOT / "models" / "smollm2-135m-instruct"
SMALL = ["data.train_limit=32", "eval.limit=12", "undo.probe_limit=12", "eval.baselines=false",
         "generation.max_new_tokens=160", "eval.max_new_tokens=160", "train.max_steps=4", "train.save_steps=2",
         "train.log_steps=1", "train.batch_size=4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    sets = [*SMALL, f"run_root={root}"]
    args = ["--config", str(CONFIG), "--executor", "local", "--undo", *[a for s in sets for a in ("--set", s)]]
    assert driver_main(args) == 0
    return load_config(CONFIG, sets)


def test_the_loop_ran_end_to_end(run):
    """Iteration 0 runs whole and iteration 1 through verify. Whether iteration 1 trains is the
    teacher's doing: a 135M model often samples no correct rationale for the 12 problems its
    student got wrong, and then the loop stops there, in one line, with iteration 0's student
    the last."""
    from distill.manifest import Manifest

    m = Manifest(run.run_dir)
    for it, stages in ((0, ("generate", "verify", "train", "evaluate")), (1, ("mine", "generate", "verify"))):
        for stage in stages:
            assert m.stage(it, stage)["state"] == "done", (it, stage)
    assert json.loads(RunPaths(run.run_dir).eval(0, 1).metrics("student").read_text())["n"] == 12
    assert m.stage(1, "mine")["metrics"]["probed"] == 12
    if m.stage(1, "verify")["metrics"]["kept"] == 0:
        train = m.stage(1, "train")
        assert train["state"] == "failed" and "verify kept 0 rationales" in train["error"], train
        assert not RunPaths(run.run_dir).student(1).exists()
    else:
        assert m.stage(1, "evaluate")["state"] == "done"
        assert json.loads(RunPaths(run.run_dir).eval(1, 1).metrics("student").read_text())["n"] == 12


def test_the_chat_template_is_applied_once_and_the_end_of_turn_token_ends_answers(run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    records = read_jsonl(RunPaths(run.run_dir).generations(0))
    assert len(records) == run.data.train_limit * run.generation.n
    for r in records:
        assert r["prompt"].count("<|im_start|>assistant\n") == 1 and r["prompt"].endswith("<|im_start|>assistant\n")
        assert r["prompt"].count("<|im_start|>user\n") == 1 and r["prompt"].startswith("<|im_start|>system\n")
        assert "<|im_end|>" not in r["response"]
    # The model's end-of-turn token (its EOS, id 2, counted) ends answers within the limit (as its
    # last token, at the latest); the others stop exactly at it.
    ended = [r for r in records if r["finished"]]
    assert tok.eos_token == "<|im_end|>" and len(ended) >= len(records) // 3
    assert all(r["n_tokens"] <= run.generation.max_new_tokens for r in ended)
    assert sum(r["n_tokens"] < run.generation.max_new_tokens for r in ended) >= len(ended) // 2
    assert all(r["n_tokens"] == run.generation.max_new_tokens for r in records if not r["finished"])


def test_answers_are_extracted_from_real_prose(run):
    graded = read_jsonl(RunPaths(run.run_dir).eval(0, 1).graded("student"))
    found = [r for r in graded if r["pred_answer"] is not None]
    # The prompt asks for "The answer is N."; about 4 in 5 untrained answers say it (README).
    assert len(found) >= len(graded) // 3, [r["response"][-80:] for r in graded]
    for r in found:
        assert r["pred_answer"] in r["response"], r


def test_training_data_survives_the_tokenizer_round_trip_and_ends_with_eos(run):
    from transformers import AutoTokenizer

    from distill.prompts import training_pairs
    from distill.training import tokenize_pairs

    tok = AutoTokenizer.from_pretrained(MODEL)
    data = read_jsonl(RunPaths(run.run_dir).train_data(0))
    assert data, "no verified rationale reached the training set"
    pairs = training_pairs(run.prompt, data, tok)
    for (prompt, completion), ex in zip(pairs, tokenize_pairs(tok, pairs, max_length=4096), strict=True):
        assert ex["input_ids"][-1] == tok.eos_token_id
        assert tok.decode(ex["input_ids"][:-1]) == prompt + completion
        assert tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != -100]) == \
            completion + tok.eos_token


def test_generation_pads_on_the_left(run):
    from distill.generation import TransformersBackend

    backend = TransformersBackend(MODEL, device="cpu", dtype="auto")
    assert backend.tokenizer.padding_side == "left"
    enc = backend.tokenizer(["a", "a much longer prompt than the first"], padding=True, return_tensors="pt")
    assert enc["attention_mask"][0, 0] == 0 and enc["attention_mask"][0, -1] == 1
