import json
import signal
import time

import pytest

from distill.train_config import TrainConfig
from distill.training import collate, micro_batch_indices, newest_checkpoint, pack, tokenize_pairs, train
from tests.conftest import run_python, spawn_python


def pairs():
    return [(f"Question: {a} plus {b}?\nAnswer: ", f"{a}+{b}={a + b}. \\boxed{{{a + b}}}")
            for a in range(8) for b in range(4)]


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
from distill.train_config import TrainConfig
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


@pytest.mark.parametrize("precision, dtype", [("bf16", "bfloat16"), ("fp32", "float32")])
def test_the_final_model_is_saved_in_the_training_precision(tiny_world, tmp_path, precision, dtype):
    """bf16 training leaves a bf16 model (what vLLM loads, half the bytes of float32)."""
    import torch
    from safetensors import safe_open

    from distill.modeling import saved_dtype

    cfg = TrainConfig(lr=1e-2, max_steps=2, batch_size=8, save_steps=100, max_length=64, precision=precision)
    result = train(tiny_world.student, pairs(), cfg, tmp_path / "run", progress=False)
    assert saved_dtype(result.model_dir) == dtype
    with safe_open(str(result.model_dir / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}  # noqa: SIM118
    # the checkpoints keep float32 master weights whatever the precision
    ckpt = newest_checkpoint(tmp_path / "run" / "checkpoints")
    with safe_open(str(ckpt / "weights.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118


def test_a_quantized_student_is_merged_into_its_base_reloaded_in_bf16(tiny_world, tmp_path):
    """Merging LoRA into 4-bit weights would re-quantize them and lose part of the update: the
    adapter goes onto the base reloaded in bf16 instead. Checked here with a LoRA student taking
    the same save path (bitsandbytes itself needs CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.device import placement
    from distill.modeling import load_student, save_final
    from distill.train_config import LoraConfig

    cfg = TrainConfig(lora=LoraConfig(enabled=True, r=4, alpha=8), max_length=64)
    model, tokenizer = load_student(tiny_world.student, cfg, placement("fp32", "cpu"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # as if trained
    a = dict(model.named_parameters())
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = (a[f"{key}.lora_B.default.weight"] @ a[f"{key}.lora_A.default.weight"]).detach() * (8 / 4)
    out = save_final(model, tokenizer, tmp_path / "model", dtype=torch.bfloat16, base_path=tiny_world.student,
                     quantized=True)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tiny_world.student, dtype=torch.bfloat16)
    want = (base.model.layers[0].self_attn.q_proj.weight.float() + delta).to(torch.bfloat16)
    got = merged.model.layers[0].self_attn.q_proj.weight
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want.float(), atol=1e-2)
    assert not torch.equal(got, base.model.layers[0].self_attn.q_proj.weight)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_a_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tiny_world, tmp_path):
    """A damaged frozen weight (a LoRA base) turns the loss into NaN after a resume: the job
    stops before the update, names the step, and step 2's checkpoint stays the newest."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from distill.errors import DistillError
    from distill.train_config import LoraConfig

    base = tmp_path / "student"
    shutil.copytree(tiny_world.student, base)
    cfg = TrainConfig(lr=1e-2, max_steps=6, batch_size=8, save_steps=1, max_length=64, lora=LoraConfig(enabled=True))
    calls = iter(range(100))
    first = train(base, pairs(), cfg, tmp_path / "run", progress=False, should_stop=lambda: next(calls) == 1)
    assert first.step == 2 and not first.finished
    weights = load_file(str(base / "model.safetensors"))
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DistillError, match=r"train: loss is nan at step 3: stopped before the update; the last good "
                                           r"checkpoint is .*step-00000002"):
        train(base, pairs(), cfg, tmp_path / "run", progress=False)
    assert newest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000002"
    assert not (tmp_path / "run" / "model").exists()


def test_checkpoints_carry_the_accelerators_random_state(monkeypatch):
    """Dropout and sampling on a GPU draw from CUDA's generator: it is saved and restored with
    the others (faked here, there is no CUDA)."""
    import torch

    from distill.device import rng_state, set_rng_state

    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.tensor([7, 1], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device=None: restored.append((state.tolist(), device)))
    gpu = torch.device("cuda", 1)
    state = rng_state(gpu)
    assert state["cuda"].tolist() == [7, 1] and {"python", "numpy", "torch"} <= set(state)
    set_rng_state(state, gpu)
    assert restored == [([7, 1], gpu)]
    assert "cuda" not in rng_state(torch.device("cpu"))


def test_lora_adapters_start_from_the_seed_and_leave_the_callers_random_state_alone(tiny_world):
    """Two runs of one LoRA config start from the same adapters (a rerun is a rerun); another
    seed starts elsewhere; and building them does not move the global random stream."""
    import torch

    from distill.device import placement
    from distill.modeling import load_student
    from distill.train_config import LoraConfig

    def adapters(seed: int) -> dict:
        cfg = TrainConfig(seed=seed, lora=LoraConfig(enabled=True, r=4, alpha=8))
        model, _ = load_student(tiny_world.student, cfg, placement("fp32", "cpu"))
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = adapters(0)
    assert torch.equal(torch.rand(3), expected)
    again, other = adapters(0), adapters(1)
    assert first and first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)


def test_prompts_that_all_exceed_max_length_are_one_line(tiny_world, tmp_path):
    from distill.errors import DistillError

    cfg = TrainConfig(max_steps=1, batch_size=2, max_length=4)
    with pytest.raises(DistillError, match=r"^train: no training examples: all 3 prompts are at least "
                                           r"train.max_length \(4\) tokens long; raise train.max_length$"):
        train(tiny_world.student, pairs()[:3], cfg, tmp_path / "out", progress=False)
