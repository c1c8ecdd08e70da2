"""Distillation losses against values worked out by hand, and every objective training the tiny
student from a config: its loss falls and a stopped run resumes to the uninterrupted result."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from distill import divergences
from distill.config import ConfigError, load_config
from distill.distillation import TopKStore
from distill.errors import DistillError
from distill.train_config import KDConfig, TrainConfig
from distill.training import newest_checkpoint, train
from tests.test_training import pairs

P, Q = [0.5, 0.5], [0.25, 0.75]  # teacher, student


def logs(*dists: list[float]) -> torch.Tensor:
    return torch.tensor(dists, dtype=torch.float64).log()


def kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True))


# -- divergences ---------------------------------------------------------------------------------


def test_forward_and_reverse_kl_by_hand():
    # forward: 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln 2 + 0.5 ln(2/3)
    assert (divergences.divergence(logs(P), logs(Q), "forward_kl").item()
            == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3)))
    # reverse: 0.25 ln(0.25/0.5) + 0.75 ln(0.75/0.5)
    assert (divergences.divergence(logs(P), logs(Q), "reverse_kl").item()
            == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5)))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_generalised_jsd_by_hand(beta):
    got = divergences.divergence(logs(P), logs(Q), "jsd", beta).item()
    if beta == 0.0:
        want = kl(P, Q)  # forward KL
    elif beta == 1.0:
        want = kl(Q, P)  # reverse KL
    else:
        m = [0.375, 0.625]  # 0.5 * P + 0.5 * Q
        want = 0.5 * kl(P, m) + 0.5 * kl(Q, m)
        assert want == pytest.approx(0.0338224, abs=1e-6)
    assert got == pytest.approx(want, abs=1e-9)


def test_temperature_divides_both_sides_logits():
    teacher = torch.tensor([[[0.0, math.log(3.0)]]])  # p = [0.25, 0.75] at T = 1
    student = torch.zeros(1, 1, 2)  # uniform at any T
    d1, _ = divergences.full_kd(student, teacher, "forward_kl", temperature=1.0)
    d2, ent2 = divergences.full_kd(student, teacher, "forward_kl", temperature=2.0)
    assert d1.item() == pytest.approx(kl([0.25, 0.75], [0.5, 0.5]), abs=1e-6)
    s3 = math.sqrt(3.0)  # at T = 2 the teacher's logits are [0, ln 3 / 2]: p = [1, √3] / (1 + √3)
    p2 = [1 / (1 + s3), s3 / (1 + s3)]
    assert d2.item() == pytest.approx(kl(p2, [0.5, 0.5]), abs=1e-6)
    assert ent2.item() == pytest.approx(-sum(x * math.log(x) for x in p2), abs=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_kd_equals_full_kd_when_k_is_the_vocabulary(kind):
    torch.manual_seed(0)
    vocab = 7
    student, teacher = torch.randn(2, 5, vocab), torch.randn(2, 5, vocab)
    top = teacher.log_softmax(-1).topk(vocab, dim=-1)
    full, full_ent = divergences.full_kd(student, teacher, kind, beta=0.3, temperature=1.5)
    topk, topk_ent = divergences.topk_kd(student, top.indices, top.values, kind, beta=0.3, temperature=1.5)
    assert torch.allclose(full, topk, atol=1e-5) and torch.allclose(full_ent, topk_ent, atol=1e-5)
    small, _ = divergences.topk_kd(student, top.indices[..., :3], top.values[..., :3], kind, beta=0.3, temperature=1.5)
    assert not torch.allclose(full, small, atol=1e-3)  # truncation changes it


def test_kd_gradient_reaches_only_the_student():
    student = torch.randn(1, 3, 5, requires_grad=True)
    teacher = torch.randn(1, 3, 5, requires_grad=True)
    d, _ = divergences.full_kd(student, teacher, "forward_kl")
    d.sum().backward()
    assert student.grad is not None and teacher.grad is None


# -- entropy masks -------------------------------------------------------------------------------


def test_top_fraction_selects_ceil_k_l_valid_positions_per_sequence():
    scores = torch.tensor([[9.0, 9.0, 1.0, 5.0, 3.0, 4.0, 2.0, 0.0],   # positions 0-1: prompt
                           [0.0, 1.0, 2.0, 3.0, 4.0, 9.0, 9.0, 9.0]])  # positions 5-7: padding
    valid = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    mask = divergences.top_fraction_mask(scores, valid, 0.25)
    # row 0: L = 6, ceil(1.5) = 2 -> positions 3 (5.0) and 5 (4.0); row 1: L = 5, ceil(1.25) = 2 -> 4, 3
    assert mask[0].nonzero().flatten().tolist() == [3, 5]
    assert mask[1].nonzero().flatten().tolist() == [3, 4]
    assert not (mask & ~valid).any()
    assert divergences.top_fraction_mask(scores, valid, 1.0).equal(valid)


def test_bucket_keeps_the_positions_between_two_percentiles():
    scores = torch.tensor([[float(s) for s in (5, 0, 9, 1, 8, 2, 7, 3, 6, 4)] + [100.0, 100.0]])
    valid = torch.tensor([[True] * 10 + [False, False]])
    # ascending ranks 0..9 are percentiles 0, 10, ..., 90: [70, 80) is rank 7, the score 7 at position 6
    assert divergences.bucket_mask(scores, valid, 70, 80).nonzero()[:, 1].tolist() == [6]
    assert divergences.bucket_mask(scores, valid, 70, 90).nonzero()[:, 1].tolist() == [4, 6]  # scores 8 and 7
    assert divergences.bucket_mask(scores, valid, 0, 100).equal(valid)


# -- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sets, message", [
    (["train.objective=distil"], "train.objective: expected one of context, ekd, feature, kd, onpolicy, sft "
                                 "(or a module path that defines OBJECTIVE), got 'distil'"),
    (["train.objective=ekd", "train.kd.bucket=[70, 80]"], "ekd needs exactly one of top_k_percent and bucket"),
    (["train.objective=ekd", "train.kd.top_k_percent=null", "train.kd.bucket=[80, 70]"],
     "train.kd.bucket: expected [lower, upper]"),
    (["train.kd.loss=kl"], "train.kd.loss: expected one of forward_kl, reverse_kl, jsd"),
    (["train.kd.beta=1.5"], "train.kd.beta: must be in [0, 1]"),
    (["train.objective=context", "train.kd.teacher=offline"], "context distillation needs the teacher online"),
    (["train.quantize=4bit"], "train.quantize: 4bit trains LoRA adapters"),
])
def test_objective_settings_are_checked_before_anything_runs(sets, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("configs/tiny.yaml", sets)


# -- training with each objective -------------------------------------------------------------------

OBJECTIVES = {
    "kd": {"loss": "forward_kl"},
    "kd-jsd": {"loss": "jsd", "beta": 0.5, "temperature": 2.0},
    "kd-offline": {"teacher": "offline", "top_k": 8},
    "ekd": {"top_k_percent": 0.5, "score": "student_entropy"},
    "ekd-bucket": {"top_k_percent": None, "bucket": [50.0, 100.0]},
    "context": {},
    "feature": {},
}


def objective_cfg(name: str, steps: int) -> TrainConfig:
    cfg = TrainConfig(objective=name.split("-")[0], lr=1e-2, max_steps=steps, batch_size=8, save_steps=5, log_steps=1,
                      max_length=64, kd=KDConfig(**OBJECTIVES[name]))
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_each_objective_trains_and_resumes(tiny_world, tmp_path, name):
    cfg = objective_cfg(name, 20)
    full = train(tiny_world.student, pairs(), cfg, tmp_path / "full", progress=False, teacher_path=tiny_world.teacher)
    hist = json.loads((newest_checkpoint(tmp_path / "full" / "checkpoints") / "state.json").read_text())["history"]
    assert full.finished and full.step == 20
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"], hist
    # Stop after step 7 (saved there), then resume: the same final step and loss as uninterrupted.
    calls = iter(range(100))
    stopped = train(tiny_world.student, pairs(), cfg, tmp_path / "split", progress=False,
                    teacher_path=tiny_world.teacher,
                    should_stop=lambda: next(calls) == 6)
    assert not stopped.finished and stopped.step == 7
    resumed = train(tiny_world.student, pairs(), cfg, tmp_path / "split", progress=False,
                    teacher_path=tiny_world.teacher)
    assert resumed.resumed_from == 7 and resumed.step == 20
    assert resumed.loss == pytest.approx(full.loss, abs=1e-6)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resumed.model_dir)  # a plain student, no projections
    assert not any("distill_projections" in n for n, _ in model.named_parameters())


def test_offline_topk_store_bytes_and_reuse(tiny_world, tmp_path):
    cfg = objective_cfg("kd-offline", 2)
    train(tiny_world.student, pairs(), cfg, tmp_path / "run", progress=False, teacher_path=tiny_world.teacher)
    info = json.loads((tmp_path / "run" / "teacher-topk.json").read_text())
    store, meta = TopKStore.load(tmp_path / "run" / "teacher-top8.safetensors")
    assert store.ids.shape == (int(info["tokens"]), 8) and meta["format"] == "topk-lzma-1"
    assert info["bytes_per_token"] <= 8 * 2  # under 2 bytes per entry, file overhead included
    # every stored row is the teacher's k best ids, in descending order, the best one at 0
    for i in range(len(store.offsets) - 1):
        ids, logprobs = store.rows(i)
        assert (logprobs[:, 0] == 0).all() and (logprobs[:, :-1] >= logprobs[:, 1:]).all()
        assert all(len(set(row)) == 8 for row in ids.tolist())


def test_a_store_in_the_older_format_is_captured_again(tiny_world, tmp_path, caplog):
    from safetensors.torch import save_file

    (tmp_path / "run").mkdir()
    old = tmp_path / "run" / "teacher-top8.safetensors"
    save_file({"ids": torch.zeros(3, 8, dtype=torch.int32), "logprobs": torch.zeros(3, 8, dtype=torch.float16),
               "offsets": torch.tensor([0, 3])}, str(old), metadata={"k": "8"})
    train(tiny_world.student, pairs(), objective_cfg("kd-offline", 2), tmp_path / "run", progress=False,
          teacher_path=tiny_world.teacher)
    assert "written for other settings" in caplog.text
    assert TopKStore.load(old)[1]["format"] == "topk-lzma-1"


@pytest.mark.parametrize("objective", ["kd", "feature"])
def test_teacher_with_another_vocabulary_fails_at_start(tiny_world, tmp_path, objective):
    """Feature distillation too: the teacher would read the student's ids as other tokens."""
    from distill.tiny import build_model, build_tokenizer

    build_tokenizer(["a completely different corpus of words"] * 4, tmp_path / "tok", vocab_size=120)
    other = build_model(tmp_path / "tok", tmp_path / "other", hidden_size=32, num_layers=1, intermediate_size=32,
                        seed=3,
                        num_heads=2, num_kv_heads=1, max_position_embeddings=256)
    with pytest.raises(DistillError, match="the teacher's tokenizer differs from the student's .*: "
                                           f"objective {objective} "
                                           "needs the student's vocabulary to be the teacher's"):
        train(tiny_world.student, pairs(), objective_cfg(objective, 2), tmp_path / "run", progress=False,
              teacher_path=other)
    assert not newest_checkpoint(tmp_path / "run" / "checkpoints")


def test_a_teacher_whose_vocabulary_extends_the_students_is_accepted(tiny_world, tmp_path):
    """Qwen3's tokenizer is Qwen2.5's plus a few tokens at the end: the ids the student uses mean
    the same tokens to the teacher, whose extra rows are left out of the distribution."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.device import placement
    from distill.distillation import Distiller, vocabulary_relation
    from distill.layout import TrainPaths

    tok = AutoTokenizer.from_pretrained(tiny_world.teacher)
    n = len(tok)
    tok.add_tokens(["<think>", "</think>"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_world.teacher)
    teacher.resize_token_embeddings(len(tok))
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    student_tok = AutoTokenizer.from_pretrained(tiny_world.student)
    assert vocabulary_relation(student_tok, tok) == "prefix"
    assert vocabulary_relation(tok, student_tok) == "different"  # the other way round, ids would not exist
    for name in ("kd", "feature"):
        result = train(tiny_world.student, pairs(), objective_cfg(name, 2), tmp_path / name, progress=False,
                       teacher_path=tmp_path / "teacher")
        assert result.finished
    distiller = Distiller(objective_cfg("kd", 2), student_tok, tmp_path / "teacher", TrainPaths(tmp_path), [],
                          placement("fp32", "cpu"))
    assert distiller.t_weight.shape[0] == n


# -- python -m distill compare ------------------------------------------------------------------------


def test_compare_trains_and_evaluates_one_student_per_objective(tiny_world, tmp_path):
    from distill.compare import compare
    from distill.jsonl import read_jsonl, write_jsonl

    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    with pytest.raises(DistillError, match="verified.jsonl: not found; run iteration 0 first"):
        compare(cfg, ["sft"], [], steps=3, progress=False)
    problems = read_jsonl(tiny_world.data / "train.jsonl")
    write_jsonl(tmp_path / "runs" / "t" / "iter-0" / "verified.jsonl",
                [{"id": f"{p['id']}#0", "problem_id": p["id"], "question": p["question"], "gold": p["answer"],
                  "response": p["solution"], "correct": True} for p in problems])
    with pytest.raises(DistillError, match="--objectives: unknown 'distil'"):
        compare(cfg, ["sft", "distil"], [], steps=3, progress=False)

    table = compare(cfg, ["sft", "kd-offline", "feature"], [], steps=3, progress=False)
    root = tmp_path / "runs" / "t" / "compare" / "steps-3"
    rows = json.loads((root / "compare.json").read_text())
    assert list(rows) == ["sft", "kd-offline", "feature"]
    for name, row in rows.items():
        graded = read_jsonl(root / "eval" / name / "graded.jsonl")
        assert row["steps"] == 3 and row["n"] == len(graded) == 8
        assert row["accuracy"] == round(sum(r["correct"] for r in graded) / len(graded), 4)
        assert f"| {name} | " in table
    assert 0 < rows["kd-offline"]["topk_bytes_per_token"] <= 20 * 2 and rows["sft"]["topk_bytes_per_token"] is None
    assert (root / "compare.md").read_text().endswith(table)
    assert all(row["train_s"] > 0 for row in rows.values())
    # Again: every student is found trained and evaluated, nothing changes.
    checkpoints = {p: p.stat().st_mtime_ns for p in root.glob("*/checkpoints/*/weights.safetensors")}
    graded = {p: p.stat().st_mtime_ns for p in root.glob("eval/*/shard-*-of-*.jsonl")}
    assert len(checkpoints) == 3 and len(graded) == 6  # per model: the generated and the graded shard
    assert compare(cfg, ["sft", "kd-offline", "feature"], [], steps=3, progress=False) == table
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints  # no step trained again
    assert {p: p.stat().st_mtime_ns for p in graded} == graded  # nothing generated again


@pytest.mark.slow
def test_compare_over_seeds_gives_mean_sd_and_every_seed(tiny_world, tmp_path):
    import statistics

    from distill.compare import compare
    from distill.jsonl import read_jsonl, write_jsonl

    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    problems = read_jsonl(tiny_world.data / "train.jsonl")
    write_jsonl(tmp_path / "runs" / "t" / "iter-0" / "verified.jsonl",
                [{"id": f"{p['id']}#0", "problem_id": p["id"], "question": p["question"], "gold": p["answer"],
                  "response": p["solution"], "correct": True} for p in problems])
    table = compare(cfg, ["sft", "kd"], ["train.lr=0.05"], steps=4, progress=False, seeds=[0, 1, 2])
    root = tmp_path / "runs" / "t" / "compare" / "steps-4"
    rows = json.loads((root / "compare.json").read_text())
    assert list(rows) == ["sft", "kd"] and (root / "compare.png").stat().st_size > 0
    for name, row in rows.items():
        each = [read_jsonl(root / "eval" / f"{name}-seed{s}" / "graded.jsonl") for s in (0, 1, 2)]
        accuracies = [round(sum(r["correct"] for r in g) / len(g), 4) for g in each]
        assert row["seeds"] == [0, 1, 2] and row["accuracies"] == accuracies
        assert row["accuracy"] == round(statistics.mean(accuracies), 4)
        assert row["accuracy_sd"] == round(statistics.stdev(accuracies), 4)
        cells = f"{100 * row['accuracy']:.1f} ± {100 * row['accuracy_sd']:.1f}% ("
        assert f"| {name} | " in table and cells in table
    weights = [(root / f"sft-seed{s}" / "model" / "model.safetensors").read_bytes() for s in (0, 1)]
    assert weights[0] != weights[1]  # the seed reached training
