"""On-policy distillation: the student's own samples, reproducible across a kill and a resume,
the loss TRL's generalised JSD, and at lmbda 0, beta 0 the forward-KL KD of the rationales."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest
import torch

from distill.integrity import content_hash
from distill.objectives.onpolicy import OnPolicy
from distill.train_config import KDConfig, OnPolicyConfig, TrainConfig
from distill.training import newest_checkpoint, tokenize_pairs, train
from tests.conftest import ROOT
from tests.test_training import pairs


def config(**onpolicy) -> TrainConfig:
    return TrainConfig(lr=1e-2, max_steps=4, batch_size=4, save_steps=2, log_steps=1, max_length=64,
                       objective="onpolicy", onpolicy=OnPolicyConfig(max_new_tokens=12, **onpolicy), report_to=[])


def history(out) -> list[dict]:
    return json.loads((newest_checkpoint(out / "checkpoints") / "state.json").read_text())["history"]


def test_samples_are_the_student_s_own_and_depend_on_seed_step_and_example_alone(tiny_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_world.student)
    trainer = SimpleNamespace(student=AutoModelForCausalLM.from_pretrained(tiny_world.student), tokenizer=tok)
    examples = tokenize_pairs(tok, pairs()[:4], 64)
    objective = OnPolicy(config())
    first = objective.resample(trainer, examples, [0, 1, 2, 3], step=5, micro=0)
    assert objective.resample(trainer, examples, [0, 1, 2, 3], step=5, micro=0) == first
    alone = objective.resample(trainer, examples[2:3], [2], step=5, micro=0)  # another rank's part, say
    assert alone == first[2:3]
    assert objective.resample(trainer, examples, [0, 1, 2, 3], step=6, micro=0) != first
    for sample, example in zip(first, examples, strict=True):
        prompt = sum(1 for lab in example["labels"] if lab == -100)
        assert sample["input_ids"][:prompt] == example["input_ids"][:prompt]
        assert sample["labels"][:prompt] == [-100] * prompt
        assert sample["labels"][prompt:] == sample["input_ids"][prompt:]
        assert 1 <= len(sample["input_ids"]) - prompt <= 12
    assert [s["input_ids"] for s in first] != [e["input_ids"] for e in examples]
    assert OnPolicy(config(lmbda=0.0)).resample(trainer, examples, [0, 1, 2, 3], 5, 0) is examples


@pytest.mark.slow
def test_a_killed_and_resumed_run_samples_the_same_tokens_and_ends_at_the_same_loss(tiny_world, tmp_path):
    cfg = config()
    whole = train(tiny_world.student, pairs(), cfg, tmp_path / "whole", progress=False,
                  teacher_path=tiny_world.teacher)
    calls = itertools.count()
    cut = train(tiny_world.student, pairs(), cfg, tmp_path / "cut", progress=False, teacher_path=tiny_world.teacher,
                should_stop=lambda: next(calls) == 2)  # stops after step 3, saved there
    assert not cut.finished and cut.step == 3
    resumed = train(tiny_world.student, pairs(), cfg, tmp_path / "cut", progress=False,
                    teacher_path=tiny_world.teacher)
    assert resumed.resumed_from == 3 and resumed.finished
    assert resumed.loss == pytest.approx(whole.loss, abs=1e-6)
    assert [h["loss"] for h in history(tmp_path / "cut")] == pytest.approx([h["loss"] for h in
                                                                           history(tmp_path / "whole")], abs=1e-6)
    assert content_hash(tmp_path / "cut" / "model") == content_hash(tmp_path / "whole" / "model")


@pytest.mark.slow
@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
def test_lmbda_0_beta_0_is_forward_kl_kd_on_the_rationales(tiny_world, tmp_path, ce_weight):
    """With every micro-batch a verified rationale, onpolicy is KD, its CE share kd's 1 - alpha."""
    onpolicy = train(tiny_world.student, pairs(), config(lmbda=0.0, beta=0.0, ce_weight=ce_weight),
                     tmp_path / "onpolicy", progress=False, teacher_path=tiny_world.teacher)
    kd = TrainConfig(lr=1e-2, max_steps=4, batch_size=4, save_steps=2, log_steps=1, max_length=64, objective="kd",
                     kd=KDConfig(loss="forward_kl", alpha=1.0 - ce_weight), report_to=[])
    offpolicy = train(tiny_world.student, pairs(), kd, tmp_path / "kd", progress=False, teacher_path=tiny_world.teacher)
    assert onpolicy.loss == pytest.approx(offpolicy.loss, abs=1e-6)
    for key in ("loss", "ce", "teacher_term"):
        assert [h[key] for h in history(tmp_path / "onpolicy")] == pytest.approx(
            [h[key] for h in history(tmp_path / "kd")], abs=1e-6)
    if ce_weight:  # the CE's share is in the loss, and out of the teacher's term
        h = history(tmp_path / "onpolicy")[0]
        assert h["loss"] - h["teacher_term"] == pytest.approx(ce_weight * h["ce"], abs=1e-5)


@pytest.mark.slow
def test_lmbda_0_beta_0_context_is_forward_kl_context_distillation(tiny_world, tmp_path):
    onpolicy = train(tiny_world.student, pairs(), config(lmbda=0.0, beta=0.0, context=True), tmp_path / "onpolicy",
                     progress=False, teacher_path=tiny_world.teacher)
    context = TrainConfig(lr=1e-2, max_steps=4, batch_size=4, save_steps=2, log_steps=1, max_length=64,
                          objective="context", kd=KDConfig(loss="forward_kl", alpha=1.0), report_to=[])
    offpolicy = train(tiny_world.student, pairs(), context, tmp_path / "context", progress=False,
                      teacher_path=tiny_world.teacher)
    assert onpolicy.loss == pytest.approx(offpolicy.loss, abs=1e-6)
    plain = train(tiny_world.student, pairs(), config(lmbda=0.0, beta=0.0), tmp_path / "plain", progress=False,
                  teacher_path=tiny_world.teacher)
    assert abs(plain.loss - onpolicy.loss) > 1e-4  # the teacher's own prompt changes what it says


def test_with_context_the_teacher_reads_the_student_s_sample_after_its_own_prompt(tiny_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_world.student)
    trainer = SimpleNamespace(student=AutoModelForCausalLM.from_pretrained(tiny_world.student), tokenizer=tok)
    objective = OnPolicy(config(context=True))
    examples = tokenize_pairs(tok, pairs()[:2], 64, teacher_prompt=objective.teacher_prompt)
    for source, sample in zip(examples, objective.resample(trainer, examples, [0, 1], 5, 0), strict=True):
        own = [t for t, lab in zip(source["t_input_ids"], source["t_labels"], strict=True) if lab == -100]
        completion = [t for t in sample["labels"] if t != -100]
        assert tok.decode(own).startswith("Solve step by step") and completion
        assert sample["t_input_ids"] == own + completion
        assert sample["t_labels"] == [-100] * len(own) + completion


def test_sampled_micro_batches_carry_no_cross_entropy(tiny_world):
    """Under ce_weight the rationales' micro-batches mix in their CE; the student's own samples
    are never targets: their micro-batch's teacher term has all the weight."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.training import collate

    tok = AutoTokenizer.from_pretrained(tiny_world.student)
    trainer = SimpleNamespace(student=AutoModelForCausalLM.from_pretrained(tiny_world.student), tokenizer=tok)
    examples = tokenize_pairs(tok, pairs()[:4], 64)
    objective = OnPolicy(config(lmbda=0.5, ce_weight=0.25))
    kinds = {objective.sampled(step, 0) for step in range(8)}
    assert kinds == {True, False}
    for step in range(8):
        batch = collate(objective.resample(trainer, examples, [0, 1, 2, 3], step, 0), tok.pad_token_id)
        assert objective.batch_alpha(batch) == (1.0 if objective.sampled(step, 0) else 0.75)


@pytest.mark.parametrize(("sets", "says"), [
    (["train.onpolicy.ce_weight=0.2"], r"train\.onpolicy\.ce_weight.*lmbda 1 every one is sampled"),
    (["train.onpolicy.sampler=vllm", "train.distributed=ddp"], r"train\.onpolicy\.sampler.*one engine in one process"),
])
def test_settings_that_cannot_work_are_refused_by_key(sets, says):
    from distill.config import load_config
    from distill.errors import ConfigError

    with pytest.raises(ConfigError, match=says):
        load_config(ROOT / "configs" / "tiny.yaml", ["train.objective=onpolicy", *sets])


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_the_loss_is_trl_s_generalized_jsd(beta):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 7, 50) * 3, torch.randn(2, 7, 50) * 3
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100  # a prompt: no loss there
    mask = labels != -100
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, num_items_in_batch=int(mask.sum()))
    trainer = SimpleNamespace(t_weight=torch.eye(50))
    objective = OnPolicy(config(beta=beta))
    mine = objective.divergence(trainer, student[mask], {"t_hidden": teacher[mask]}).mean()
    assert mine.item() == pytest.approx(theirs.item(), abs=1e-4)


def test_undo_iterations_may_train_with_another_objective(tiny_world, tmp_path):
    from distill.config import iteration_train, load_config
    from distill.errors import ConfigError

    path = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    cfg = load_config(path, ["undo.objective=onpolicy", "train.onpolicy.lmbda=0.5"])
    assert iteration_train(cfg, 0).objective == "sft"
    assert iteration_train(cfg, 2).objective == "onpolicy" and iteration_train(cfg, 2).onpolicy.lmbda == 0.5
    plain = load_config(path)
    assert iteration_train(plain, 1) is plain.train
    assert load_config(path).hash() == load_config(path, ["undo.objective=null"]).hash()  # old runs keep their hash
    with pytest.raises(ConfigError, match=r"train\.objective: expected one of .* got 'onpolicyy'"):
        load_config(path, ["undo.objective=onpolicyy"])
    with pytest.raises(ConfigError, match="onpolicy samples from the whole student on each rank"):
        load_config(path, ["undo.objective=onpolicy", "train.distributed=fsdp"])


def test_onpolicy_errors_draw_a_share_of_the_sampled_prompts_from_the_focus(tiny_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.training import Focus

    tok = AutoTokenizer.from_pretrained(tiny_world.student)
    examples = tokenize_pairs(tok, pairs()[:4], 64)
    prompt_of = [ex["input_ids"][: ex["labels"].count(-100)] for ex in examples]
    assert len({tuple(p) for p in prompt_of}) == 4
    pool = Focus(frozenset({pairs()[3][0]}), 1.0).indices(tok, examples)
    assert pool == [3]
    student = AutoModelForCausalLM.from_pretrained(tiny_world.student)

    def prompts(share: float, step: int) -> list[list[int]]:
        trainer = SimpleNamespace(student=student, tokenizer=tok, examples=examples, focus=(pool, share))
        drawn = OnPolicy(config()).resample(trainer, examples, [0, 1, 2, 3], step=step, micro=0)
        return [s["input_ids"][: s["labels"].count(-100)] for s in drawn]

    assert prompts(1.0, 5) == [prompt_of[3]] * 4
    unfocused = OnPolicy(config()).resample(SimpleNamespace(student=student, tokenizer=tok), examples, [0, 1, 2, 3],
                                            step=5, micro=0)
    assert prompts(0.0, 5) == [s["input_ids"][: s["labels"].count(-100)] for s in unfocused] == prompt_of
    mixed = [p for step in range(4) for p in prompts(0.5, step)]
    assert mixed == [p for step in range(4) for p in prompts(0.5, step)]  # the same draws every time
    moved = sum(p == prompt_of[3] for p in mixed) - 4  # example 3 itself draws its own prompt either way
    assert 0 < moved < 12


def test_an_undo_iteration_focuses_onpolicy_on_its_mined_errors(tiny_world, tmp_path, monkeypatch):
    from distill import training
    from distill.config import load_config
    from distill.errors import ConfigError
    from distill.jsonl import write_jsonl
    from distill.layout import RunPaths
    from distill.modeling import load_tokenizer
    from distill.prompts import build_prompt
    from distill.stage import Unit
    from distill.student import train_student

    path = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    with pytest.raises(ConfigError, match="undo.onpolicy_errors.*draws no prompts; set undo.objective: onpolicy"):
        load_config(path, ["undo.onpolicy_errors=0.5"])
    assert load_config(path).hash() == load_config(path, ["undo.onpolicy_errors=0"]).hash()
    cfg = load_config(path, ["undo.objective=onpolicy", "undo.onpolicy_errors=0.7"])
    paths = RunPaths(cfg.run_dir)
    old = [{"problem_id": f"p{i}", "question": f"What is {i} + {i}?", "response": f"{2 * i}"} for i in range(3)]
    new = [{"problem_id": "p9", "question": "What is 9 + 9?", "response": "18"}]
    paths.iteration(1).mkdir(parents=True)
    write_jsonl(paths.train_data(0), [{**r, "iteration": 0} for r in old])
    write_jsonl(paths.verified(1), new)
    seen = {}

    def fake_train(init, pairs, cfg_train, out, **kw):
        seen.update(kw, pairs=pairs, objective=cfg_train.objective)
        return training.TrainResult(False, 0, 1, None, 0.0, None, None)

    monkeypatch.setattr(training, "train", fake_train)
    train_student(Unit(cfg=cfg, iteration=1, key="0", paths=paths, progress=False))
    error_prompt = build_prompt(load_tokenizer(cfg.models.student), cfg.prompt, "What is 9 + 9?")
    assert seen["objective"] == "onpolicy" and len(seen["pairs"]) == 4
    assert seen["focus"].prompts == {error_prompt} and seen["focus"].share == 0.7


def test_train_hands_its_focus_to_the_objective(tiny_world, tmp_path, monkeypatch):
    from distill.training import Focus

    drawn = []
    sample = OnPolicy.sample
    monkeypatch.setattr(OnPolicy, "sample", lambda self, trainer, ex, seed: drawn.append(ex) or sample(
        self, trainer, ex, seed))
    cfg = config(lmbda=1.0)
    cfg.max_steps = 1
    train(tiny_world.student, pairs(), cfg, tmp_path / "run", progress=False, teacher_path=tiny_world.teacher,
          focus=Focus(frozenset({pairs()[3][0]}), 1.0))
    assert len(drawn) == 4 and all(ex["input_ids"] == drawn[0]["input_ids"] for ex in drawn)
    assert drawn[0]["labels"].count(-100) < len(drawn[0]["labels"])  # a rationale example: example 3's
