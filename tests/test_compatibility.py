"""The teacher/student compatibility check, on Qwen2.5's published configs with tokenizers laid
out as Qwen2.5's (151,643 regular tokens, then its special tokens), and through the driver."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from distill.compatibility import check_pair, model_facts, pair_findings
from distill.config import load_config
from distill.preflight import load_local_tokenizer
from jobs.driver import main as driver_main
from tests.test_examples import HF_CONFIGS
from tests.test_integrity import config

REGULAR = 151_643  # Qwen2.5's byte-level BPE tokens; its special tokens follow from this id
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(19)]  # 151,665 in all
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen_like(dest: Path, hub_id: str, eos: str, stop_ids: list[int], shuffle: bool = False) -> Path:
    """A model folder with `hub_id`'s published config.json and a word-level tokenizer with
    Qwen2.5's ids (shuffled: the same tokens under other ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(REGULAR)]
    if shuffle:
        words = words[1:] + words[:1]
    vocab = {w: i for i, w in enumerate(words + SPECIAL)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, pad_token="<|endoftext|>",
                                  additional_special_tokens=SPECIAL[1:3])
    tok.chat_template = CHATML
    tok.save_pretrained(str(dest))
    shutil.copy(HF_CONFIGS / hub_id / "config.json", dest / "config.json")
    (dest / "generation_config.json").write_text(json.dumps({"eos_token_id": stop_ids}))
    return dest


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    end, im_end = SPECIAL.index("<|endoftext|>") + REGULAR, SPECIAL.index("<|im_end|>") + REGULAR
    return {
        # Qwen2.5-Math-7B-Instruct ends turns on <|im_end|> and stops at <|endoftext|> too; 152,064 rows.
        "teacher": qwen_like(root / "teacher", "Qwen/Qwen2.5-Math-7B-Instruct", "<|im_end|>", [im_end, end]),
        # A teacher that stops only at <|im_end|>.
        "im_end_only": qwen_like(root / "im_end_only", "Qwen/Qwen2.5-Math-7B-Instruct", "<|im_end|>", [im_end]),
        # Qwen2.5-1.5B (base): EOS <|endoftext|>; 151,936 rows.
        "student": qwen_like(root / "student", "Qwen/Qwen2.5-1.5B", "<|endoftext|>", [end]),
        "shuffled": qwen_like(root / "shuffled", "Qwen/Qwen2.5-1.5B", "<|endoftext|>", [end], shuffle=True),
    }


def findings(teacher: Path, student: Path, tmp_path: Path, tiny_world, *sets: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = config(tiny_world, tmp_path, *sets)
    facts = [model_facts(f"models.{k}", p, load_local_tokenizer(str(p))) for k, p in
             (("teacher", teacher), ("student", student))]
    return pair_findings(*facts, cfg)


def test_qwen2_5_padded_rows_are_accepted_for_logit_distillation(qwen, tmp_path, tiny_world):
    found = findings(qwen["teacher"], qwen["student"], tmp_path, tiny_world, "train.objective=kd")
    assert not [f for f in found if f.blocking], found
    note = next(f.line for f in found if f.line.startswith("vocabularies"))
    assert note == ("vocabularies: same; rows past the tokenizers' 151665 tokens are padding and ignored "
                    "(models.teacher 152064, models.student 151936 rows)")


def test_a_student_whose_eos_the_teacher_never_ends_on_is_refused_for_kd_not_for_sft(qwen, tmp_path, tiny_world):
    (refused,) = [f for f in findings(qwen["im_end_only"], qwen["student"], tmp_path, tiny_world,
                                      "train.objective=kd") if f.blocking]
    assert refused.line.startswith("models.student: its EOS '<|endoftext|>' is not a token the teacher's "
                                   "rationales end with ('<|im_end|>')")
    assert not [f for f in findings(qwen["im_end_only"], qwen["student"], tmp_path / "sft", tiny_world)
                if f.blocking]


def test_a_vocabulary_that_is_not_a_prefix_is_refused_for_kd(qwen, tmp_path, tiny_world):
    (refused,) = [f for f in findings(qwen["teacher"], qwen["shuffled"], tmp_path, tiny_world,
                                      "train.objective=kd") if f.blocking]
    assert "neither the student's nor an id-preserving extension of it" in refused.line
    assert not [f for f in findings(qwen["teacher"], qwen["shuffled"], tmp_path / "sft", tiny_world)
                if f.blocking]


def test_lengths_past_a_model_s_positions_are_refused(qwen, tmp_path, tiny_world):
    lines = [f.line for f in findings(qwen["teacher"], qwen["student"], tmp_path, tiny_world, "train.objective=kd",
                                      "train.max_length=5000", "generation.max_new_tokens=4100") if f.blocking]
    assert any(line.startswith("train.max_length: needs 5000 positions, more than models.teacher has "
                               "(max_position_embeddings 4096)") for line in lines), lines
    assert any(line.startswith("generation.max_new_tokens: ") and "models.teacher" in line for line in lines), lines
    assert not any("models.student has" in line for line in lines)  # 131,072 positions


def test_the_driver_refuses_the_pair_before_anything_is_written(tiny_world, tmp_path, capsys):
    student = tmp_path / "student"
    shutil.copytree(tiny_world.student, student)
    settings = json.loads((student / "tokenizer_config.json").read_text())
    settings["eos_token"] = settings["pad_token"]  # a student that would end on another token than the teacher
    (student / "tokenizer_config.json").write_text(json.dumps(settings))
    cfg = config(tiny_world, tmp_path, f"models.student={student}", "train.objective=kd")
    assert driver_main(["--config", cfg.source, "--executor", "local", "--set", f"models.student={student}",
                        "--set", "train.objective=kd"]) == 2
    err = capsys.readouterr().err
    assert "teacher and student do not fit: models.student: its EOS" in err, err
    assert not Path(cfg.run_dir).exists()


def test_the_tiny_pair_fits_with_notes_only(tiny_world, tmp_path):
    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"), ["train.objective=kd"])
    assert check_pair(cfg, {}) == ["note: models.teacher: no chat template; its prompts are plain text",
                                   "note: models.student: no chat template; its prompts are plain text"]
