"""Tiny models for the demo world, built locally and saved the way real checkpoints are.

Nothing can be downloaded, so the tokenizer is trained here and the models are randomly
initialised Qwen2 configs; both go through `save_pretrained`/`from_pretrained`, so the rest
of the pipeline loads them exactly as it would load a hub checkpoint.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX

from distill.errors import DataError
from distill.jsonl import iter_jsonl
from distill.prompts import fill
from distill.train_config import TrainConfig

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, UNK]
DEFAULT_EXTRA_TEXTS = [
    "Question: ",
    "\nAnswer: ",
    "Previous answer: ",
    "Student answer: ",
    "Verdict: wrong",
    "Verdict: right",
]
TEACHER_SHAPE = {
    "hidden_size": 128,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 384,
}
STUDENT_SHAPE = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 2,
    "num_kv_heads": 1,
    "intermediate_size": 192,
}
# vLLM's CPU attention runs head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256 and 512 only;
# both demo models keep to 32 so the vLLM backend can load them.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _raw_tokenizer() -> Tokenizer:
    """Byte-level BPE with exactly the normalizer and pre-tokenizer that `Qwen2Tokenizer` rebuilds.

    `AutoTokenizer.from_pretrained` on a qwen2 model directory ignores tokenizer.json's pipeline
    and rebuilds Qwen2's (NFC + its split regex); matching it makes every loader agree on ids.
    That regex isolates each numeric character, so every digit is its own token.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def build_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train the tokenizer on `texts`, save it to `out_dir` and return it (left padding for generation)."""
    tok = _raw_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # The full byte alphabet makes any text encodable, even characters never seen in training.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        # Cleanup would rewrite " ." and similar, breaking exact decode round-trips.
        clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(str(out_dir))
    return wrapped


def _load_tokenizer(tokenizer_dir: str | Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))


def build_model(
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised Qwen2 causal LM with its tokenizer beside it; return `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = _load_tokenizer(tokenizer_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def count_parameters(model_dir: str | Path) -> int:
    """Unique parameters (tied embeddings counted once), as loaded from disk."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return sum(p.numel() for p in model.parameters())


def corpus_texts(data_dir: str | Path) -> list[str]:
    """Question and solution texts of every `<split>.jsonl` in `data_dir`."""
    paths = sorted(Path(data_dir).glob("*.jsonl"))
    if not paths:
        raise DataError(f"{data_dir}: no *.jsonl files")
    texts: list[str] = []
    for path in paths:
        for record in iter_jsonl(path):
            texts += [record["question"], record["solution"]]
    return texts


TEACHER_PROMPT = "Question: {question}\nAnswer: "
# The error-conditioned prompt of UNDO iterations >= 1 (configs/tiny.yaml: undo.template).
UNDO_PROMPT = (
    "Question: {question}\nPrevious answer: {previous}\nStudent answer: {student_answer}\n"
    "Verdict: {verdict}\nAnswer: "
)


def teacher_train_config(steps: int) -> TrainConfig:
    """Settings that make the tiny teacher competent in a few CPU minutes."""
    return TrainConfig(lr=2e-3, max_steps=steps, batch_size=64, warmup_ratio=0.05, lr_scheduler="cosine",
                       save_steps=max(1, steps // 10), log_steps=50, max_length=160, seed=0)


def teacher_pairs(records: list[dict], seed: int = 0) -> list[tuple[str, str]]:
    """Gold solutions behind both prompts the teacher will see: the plain one, and UNDO's
    error-conditioned one (a previous rationale or none, some wrong student answer), so regeneration
    prompts are familiar to it. The target is always the correct worked solution."""
    rng = random.Random(seed)
    pairs = []
    for r in records:
        if rng.random() < 0.5:
            prompt = fill(TEACHER_PROMPT, question=r["question"])
        else:
            previous = rng.choice([r["solution"], rng.choice(records)["solution"], "none"])
            wrong = str(rng.choice([v for v in range(0, 130) if str(v) != r["answer"]]))
            prompt = fill(UNDO_PROMPT, question=r["question"], previous=previous, student_answer=wrong, verdict="wrong")
        pairs.append((prompt, r["solution"]))
    return pairs


def train_teacher(data_dir: str | Path, init_dir: str | Path, out_dir: str | Path, steps: int) -> Path:
    """Train the teacher with the project's own training stage on the gold worked solutions."""
    from distill.training import train

    pairs = teacher_pairs(list(iter_jsonl(Path(data_dir) / "train.jsonl")))
    work = Path(out_dir).with_name(Path(out_dir).name + "-train")
    result = train(init_dir, pairs, teacher_train_config(steps), work)
    if Path(out_dir).exists():
        shutil.rmtree(out_dir)
    os.replace(result.model_dir, out_dir)
    shutil.rmtree(work, ignore_errors=True)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m distill.tiny",
        description="Build the demo tokenizer (byte-level BPE, single-digit tokens) from the world data, "
        "then a randomly initialised tiny teacher and student (Qwen2) under OUT/{tokenizer,teacher-init,student}.",
    )
    parser.add_argument("--data", required=True, help="directory with the world's <split>.jsonl files")
    parser.add_argument("--out", required=True, help="output directory for tokenizer and models")
    parser.add_argument(
        "--extra-text",
        action="append",
        default=None,
        help="prompt text the tokenizer should learn, repeatable (default: the pipeline's prompt templates)",
    )
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="model init seed (default 0)")
    parser.add_argument("--teacher-steps", type=int, default=0,
                        help="if > 0, also train OUT/teacher from teacher-init on the gold solutions "
                             "for this many steps")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()

    texts = corpus_texts(args.data)
    extras = args.extra_text if args.extra_text is not None else DEFAULT_EXTRA_TEXTS
    out = Path(args.out)
    tokenizer = build_tokenizer(texts + extras, out / "tokenizer", vocab_size=args.vocab_size)
    print(f"tokenizer: vocab {len(tokenizer)} -> {out / 'tokenizer'}")
    for name, shape in (("teacher-init", TEACHER_SHAPE), ("student", STUDENT_SHAPE)):
        path = build_model(out / "tokenizer", out / name, seed=args.seed, **shape)
        print(f"{name}: {count_parameters(path):,} parameters -> {path}")
    if args.teacher_steps > 0:
        path = train_teacher(args.data, out / "teacher-init", out / "teacher", args.teacher_steps)
        shutil.rmtree(out / "teacher-init")
        print(f"teacher: trained {args.teacher_steps} steps -> {path}")


if __name__ == "__main__":
    main()
