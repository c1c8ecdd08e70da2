import json
import signal
import time

import pytest

from distill.config import TrainConfig
from distill.training import collate, micro_batch_indices, newest_checkpoint, pack, tokenize_pairs, train
from tests.conftest import run_python, spawn_python


def pairs():
    return [(f"Question: {a} plus {b}?\nAnswer: ", f"{a}+{b}={a + b}. \\boxed{{{a + b}}}") for a in range(8) for b in range(4)]


def test_prompt_tokens_are_masked_and_eos_is_learned(tiny_world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_world.student)
    (ex,) = tokenize_pairs(tok, [("Question: 1+2?\nAnswer: ", "3")], max_length=64)
    n_prompt = len(tok("Question: 1+2?\nAnswer: ", add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tok.eos_token_id


def test_batch_order_is_a_function_of_seed_and_step():
    epoch = [i for m in range(4) for i in micro_batch_indices(10, 3, seed=7, micro=m)]
    assert sorted(epoch) == list(range(10))
    assert micro_batch_indices(10, 3, 7, 5) == micro_batch_indices(10, 3, 7, 5)
    assert micro_batch_indices(10, 3, 7, 4) != micro_batch_indices(10, 3, 8, 4)


def test_loss_falls_and_lora_merges_into_a_plain_model(tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(lr=1e-2, max_steps=30, batch_size=8, save_steps=100, log_steps=1, max_length=64)
    full = train(tiny_world.student, pairs(), cfg, tmp_path / "full", progress=False)
    hist = json.loads((newest_checkpoint(tmp_path / "full" / "checkpoints") / "state.json").read_text())["history"]
    assert full.finished and full.step == 30
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]
    cfg.lora.enabled, cfg.max_steps, cfg.lr = True, 3, 1e-2
    lora = train(tiny_world.student, pairs(), cfg, tmp_path / "lora", progress=False)
    model = AutoModelForCausalLM.from_pretrained(lora.model_dir)
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_packed_rows_keep_examples_apart(tiny_world):
    """Packed rows give every token the logits it has alone in a padded batch: attention does
    not cross example boundaries and positions restart per example."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_world.student)
    model = AutoModelForCausalLM.from_pretrained(tiny_world.student).eval()
    examples = tokenize_pairs(tok, pairs()[:7], max_length=64)
    width = 2 * max(len(e["input_ids"]) for e in examples)
    packed = pack(examples, tok.pad_token_id, width)
    assert packed["input_ids"].size(0) < len(examples) and packed["input_ids"].size(1) <= width
    assert int((packed["labels"] != -100).sum()) == sum(sum(lab != -100 for lab in e["labels"]) for e in examples)
    padded = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        p_logits = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                         position_ids=packed["position_ids"]).logits
        u_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    for i, (row, start) in enumerate(packed["placement"]):
        n = len(examples[i]["input_ids"])
        assert torch.allclose(p_logits[row, start : start + n], u_logits[i, :n], atol=1e-5)


def test_packing_trains_the_same_steps_as_padding(tiny_world, tmp_path):
    cfg = TrainConfig(lr=1e-2, max_steps=6, batch_size=8, save_steps=100, log_steps=1, max_length=64)
    padded = train(tiny_world.student, pairs(), cfg, tmp_path / "padded", progress=False)
    cfg.packing = True
    packed = train(tiny_world.student, pairs(), cfg, tmp_path / "packed", progress=False)
    history = [json.loads((newest_checkpoint(tmp_path / d / "checkpoints") / "state.json").read_text())["history"]
               for d in ("padded", "packed")]
    assert [h["step"] for h in history[0]] == [h["step"] for h in history[1]] == list(range(1, 7))
    for a, b in zip(*history, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
    assert packed.loss == pytest.approx(padded.loss, abs=1e-4)


TRAIN_CODE = """
from distill.config import TrainConfig
from distill.training import train
from tests.test_training import pairs
cfg = TrainConfig(lr=3e-3, max_steps=40, batch_size=4, save_steps=5, log_steps=1, max_length=64)
r = train({student!r}, pairs(), cfg, {out!r}, progress=False)
print("RESULT", r.step, repr(r.loss), r.resumed_from)
"""


def result_line(proc) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    return next(line for line in proc.stdout.splitlines() if line.startswith("RESULT")).split()[1:]


@pytest.mark.slow
def test_killed_training_resumes_from_newest_complete_checkpoint(tiny_world, tmp_path):
    student = str(tiny_world.student)
    reference = result_line(run_python(TRAIN_CODE.format(student=student, out=str(tmp_path / "ref")), timeout=300))

    out = tmp_path / "killed"
    ckpts = out / "checkpoints"
    proc = spawn_python(TRAIN_CODE.format(student=student, out=str(out)))
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts / "step-00000010" / "state.json").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = newest_checkpoint(ckpts)
    assert newest is not None and not (out / "model").exists(), "kill did not land mid-run"
    # A save interrupted before its rename, and a directory that looks final but is incomplete.
    (ckpts / ".tmp-step-00000099-1").mkdir()
    (ckpts / ".tmp-step-00000099-1" / "weights.safetensors").write_bytes(b"\0" * 10)
    (ckpts / "step-00000095").mkdir()
    (ckpts / "step-00000095" / "weights.safetensors").write_bytes(b"\0" * 10)

    step, loss, resumed = result_line(run_python(TRAIN_CODE.format(student=student, out=str(out)), timeout=300))
    assert int(resumed) == int(newest.name.split("-")[1]) >= 10
    assert step == reference[0] == "40"
    assert float(loss) == pytest.approx(float(reference[1]), abs=1e-6)
    assert not (ckpts / ".tmp-step-00000099-1").exists()
    assert (out / "model" / "config.json").exists()
