"""QLoRA for real: bitsandbytes' 4-bit NF4 layers on this CPU, LoRA adapters trained above them.

bitsandbytes runs 4-bit on CUDA and (from 0.49) on the CPU, so these tests train, stop, resume
and merge a 4-bit student exactly as a GPU job would; `tests/test_vllm_engine.py` loads the
merged model in vLLM.
"""

from __future__ import annotations

import json

import pytest
import torch

from distill.errors import DistillError
from distill.train_config import LoraConfig, TrainConfig
from distill.training import newest_checkpoint, train
from tests.test_training import pairs


def qlora_config(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-2, "max_steps": 8, "batch_size": 8, "save_steps": 100, "log_steps": 1,
                          "max_length": 64, "quantize": "4bit", "precision": "bf16",
                          "lora": LoraConfig(enabled=True, r=4, alpha=8), **kw})


def history(run_dir) -> list[dict]:
    return json.loads((newest_checkpoint(run_dir / "checkpoints") / "state.json").read_text())["history"]


def test_qlora_trains_on_the_cpu_with_4bit_layers(tiny_world, tmp_path):
    import bitsandbytes as bnb

    from distill.device import placement
    from distill.modeling import load_student

    model, _ = load_student(tiny_world.student, qlora_config(), placement("bf16", "cpu"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    result = train(tiny_world.student, pairs(), qlora_config(), tmp_path / "run", progress=False, device="cpu")
    losses = [h["loss"] for h in history(tmp_path / "run")]
    assert result.finished and result.step == 8 and losses[-1] < losses[0]


def test_an_inference_forward_before_training_does_not_break_the_4bit_student(tiny_world):
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place on the first
    forward in eval mode without gradients; training after that failed. A loaded student keeps
    its layout."""
    from distill.device import placement
    from distill.modeling import load_student

    model, tokenizer = load_student(tiny_world.student, qlora_config(), placement("bf16", "cpu"))
    batch = tokenizer(["Question: 1 plus 2?\nAnswer: 3"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    assert torch.isfinite(loss)


def test_a_stopped_qlora_run_resumes_to_the_uninterrupted_loss(tiny_world, tmp_path):
    whole = train(tiny_world.student, pairs(), qlora_config(), tmp_path / "whole", progress=False, device="cpu")
    calls = iter(range(100))
    stopped = train(tiny_world.student, pairs(), qlora_config(), tmp_path / "resumed", progress=False, device="cpu",
                    should_stop=lambda: next(calls) == 3)
    assert not stopped.finished and stopped.step == 4
    resumed = train(tiny_world.student, pairs(), qlora_config(), tmp_path / "resumed", progress=False, device="cpu")
    assert resumed.resumed_from == 4 and resumed.step == 8
    assert resumed.loss == pytest.approx(whole.loss, abs=1e-6)
    for a, b in zip(history(tmp_path / "whole"), history(tmp_path / "resumed"), strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_the_adapter_merges_into_a_bf16_reload_of_the_base(tiny_world, tmp_path):
    """The saved model is the base reloaded in bf16 with the adapter merged (merging into the
    4-bit weights would re-quantize them): its loss on the training data is the 4-bit student's."""
    from transformers import AutoModelForCausalLM

    from distill.device import placement
    from distill.modeling import load_student
    from distill.training import collate, tokenize_pairs

    result = train(tiny_world.student, pairs(), qlora_config(max_steps=12), tmp_path / "run", progress=False,
                   device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(result.model_dir, dtype=torch.bfloat16).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_world.student, dtype=torch.bfloat16).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    model, tokenizer = load_student(tiny_world.student, qlora_config(), placement("bf16", "cpu"))
    batch = collate(tokenize_pairs(tokenizer, pairs(), max_length=64), tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        merged_loss, base_loss = merged(**inputs).loss.item(), base(**inputs).loss.item()
    assert merged_loss < base_loss - 0.1, "the merged model did not keep the trained update"
    assert merged_loss == pytest.approx(history(tmp_path / "run")[-1]["loss"], abs=0.5)


def test_qlora_is_refused_in_one_line_where_bitsandbytes_is_missing(tiny_world, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(DistillError,
                       match=r"^train.quantize: 4bit \(QLoRA\) needs bitsandbytes, which is not installed"):
        train(tiny_world.student, pairs(), qlora_config(), tmp_path / "run", progress=False, device="cpu")
    assert newest_checkpoint(tmp_path / "run" / "checkpoints") is None
