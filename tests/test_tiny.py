"""Tiny local models: the tokenizer round-trips, digits stay single tokens, models load and generate."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from distill import demo_data as world
from distill import tiny
from distill.jsonl import read_jsonl

ARBITRARY = [
    "The quick brown fox jumps over the lazy dog.",
    "Zebras & xylophones: 3.14159 — ünïcödé, 日本語, emoji 🙂!",
    "tabs\tand   spaces\n\n\nnewlines\r\nand (brackets) [x] {y} \\frac{1}{2}",
    "  leading and trailing spaces  ",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """World data, tokenizer, teacher and student, built through the CLI like a user would."""
    root = tmp_path_factory.mktemp("tiny")
    world.write_splits(root / "data", {"train": 300, "validation": 40, "test": 40}, seed=0)
    tiny.main(["--data", str(root / "data"), "--out", str(root / "models")])
    models = root / "models"
    return {
        "data": root / "data",
        "tokenizer": models / "tokenizer",
        "teacher": models / "teacher-init",
        "student": models / "student",
    }


@pytest.fixture(scope="module")
def tok(built) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(built["tokenizer"]))


@pytest.fixture(scope="module")
def world_texts(built) -> list[str]:
    texts = []
    for rec in read_jsonl(built["data"] / "train.jsonl")[:100]:
        texts += [
            f"Question: {rec['question']}\nAnswer: ",
            f" {rec['solution']}<eos>",
            f"Student answer: {rec['solution']}\nVerdict: right",
        ]
    return texts


def _fuzz_texts(tok: PreTrainedTokenizerFast, n: int = 1000) -> list[str]:
    """Decoded random token ids: the kind of text an untrained model feeds back into prompts."""
    rng = random.Random(0)
    return [tok.decode([rng.randrange(len(tok)) for _ in range(rng.randint(1, 30))]) for _ in range(n)]


def test_tokenizer_settings(tok) -> None:
    assert (tok.eos_token, tok.pad_token, tok.unk_token) == ("<eos>", "<pad>", "<unk>")
    assert tok.padding_side == "left"
    assert not tok.chat_template
    assert len(tok) <= 512
    assert tok("<eos>").input_ids == [tok.eos_token_id]


def test_round_trip_world_and_arbitrary_text(tok, world_texts) -> None:
    for text in world_texts + ARBITRARY:
        assert tok.decode(tok(text).input_ids) == text


def test_digits_are_single_tokens(tok, world_texts) -> None:
    for d in "0123456789":
        assert len(tok(d).input_ids) == 1
    assert tok.convert_ids_to_tokens(tok("x=12345").input_ids)[-5:] == list("12345")
    for text in world_texts:
        for piece in tok.convert_ids_to_tokens(tok(text).input_ids):
            if any(ch.isdigit() for ch in piece):
                assert len(piece) == 1, (piece, text)


def test_auto_tokenizer_from_model_dir_agrees(built, tok, world_texts) -> None:
    """AutoTokenizer on a qwen2 dir rebuilds Qwen2Tokenizer's pipeline; ids must still match."""
    auto = AutoTokenizer.from_pretrained(str(built["student"]))
    assert (auto.eos_token_id, auto.pad_token_id, auto.padding_side) == (
        tok.eos_token_id,
        tok.pad_token_id,
        "left",
    )
    decomposed = "cafe\u0301 (e + combining accent)"
    for text in [*world_texts, *ARBITRARY, decomposed, *_fuzz_texts(tok)]:
        assert auto(text).input_ids == tok(text).input_ids, repr(text)


def test_models_load_with_config_from_tokenizer(built, tok) -> None:
    for name in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(str(built[name]))
        cfg = model.config
        assert cfg.model_type == "qwen2" and cfg.tie_word_embeddings
        assert cfg.vocab_size == len(tok)
        assert (cfg.eos_token_id, cfg.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
        assert model.generation_config.eos_token_id == tok.eos_token_id
        assert model.generation_config.pad_token_id == tok.pad_token_id
        assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
        assert (built[name] / "model.safetensors").exists()


def test_teacher_is_bigger_than_student(built) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(str(built["teacher"])).config
    student = AutoModelForCausalLM.from_pretrained(str(built["student"])).config
    assert (teacher.hidden_size, teacher.num_hidden_layers) == (128, 4)
    assert (student.hidden_size, student.num_hidden_layers) == (64, 2)
    assert tiny.count_parameters(built["teacher"]) > 3 * tiny.count_parameters(built["student"])


def test_greedy_generate_with_left_padded_batch(built) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(built["student"])).eval()
    auto = AutoTokenizer.from_pretrained(str(built["student"]))
    prompts = ["Question: Tom has 23 marbles.\nAnswer: ", "Question: Hi\nAnswer: "]
    batch = auto(prompts, return_tensors="pt", padding=True)
    short = len(auto(prompts[1]).input_ids)
    width = batch.input_ids.shape[1]
    assert width > short
    assert (batch.input_ids[1, : width - short] == auto.pad_token_id).all()
    assert (batch.attention_mask[1, : width - short] == 0).all()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        alone = model.generate(**auto(prompts[1:], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and 1 <= out.shape[1] - width <= 4
    # Left padding must not change what the padded row generates.
    n = alone.shape[1] - short
    assert out[1, width : width + n].tolist() == alone[0, short:].tolist()


def test_build_model_is_seeded(built, tmp_path) -> None:
    shape = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    a = tiny.build_model(built["tokenizer"], tmp_path / "a", seed=1, **shape)
    b = tiny.build_model(built["tokenizer"], tmp_path / "b", seed=1, **shape)
    c = tiny.build_model(built["tokenizer"], tmp_path / "c", seed=2, **shape)
    assert a == tmp_path / "a"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
