"""Every stage on the model's device, in the configured precision, at real sizes.

There is no GPU here, so the meta device stands in for it (tests/devicecheck.py): the training
loop of every objective runs with its models on meta under a dispatch mode that fails on any
operation mixing devices, and real-size architectures (the published Qwen2.5-1.5B and 7B
configs, no weights) get the setup each stage gives them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from distill.device import placement
from distill.distillation import Distiller, to_device
from distill.layout import TrainPaths
from distill.modeling import freeze, output_head, prepare_student, student_dtype
from distill.train_config import KDConfig, LoraConfig, TrainConfig
from distill.training import collate, newest_checkpoint, pack, tokenize_pairs, train
from tests.devicecheck import DeviceMismatch, MetaAccelerator
from tests.test_objectives import OBJECTIVES
from tests.test_training import pairs

CONFIGS = Path(__file__).parent / "data" / "configs"
PUBLISHED = {"qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512}  # parameters, from the model cards


def meta_model(name: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(CONFIGS / f"{name}.json")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def checkpointed(model) -> bool:
    """Every decoder layer recomputes its activations in backward."""
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    return bool(layers) and all(m.gradient_checkpointing for m in layers)


def test_the_check_fails_when_a_cpu_tensor_meets_the_model(tiny_world):
    """The harness itself: an embedding lookup with CPU ids works on meta without it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_world.student, device_map={"": "meta"})
    ids = torch.tensor([[1, 2, 3]])
    model(input_ids=ids)  # no error from torch itself
    with MetaAccelerator(), pytest.raises(DeviceMismatch, match="embedding"):
        model(input_ids=ids)
    with MetaAccelerator() as check:
        model(input_ids=ids.to("meta"))
    assert check.ops_on_meta > 10


CASES = {
    "sft": {},
    "sft-lora-checkpointing": {"lora": LoraConfig(enabled=True), "gradient_checkpointing": True},
    "sft-packing": {"packing": True},
    **{name: {"objective": name.split("-")[0], "kd": KDConfig(**kd)} for name, kd in OBJECTIVES.items()},
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_training_run_keeps_every_tensor_on_the_model_device(tiny_world, tmp_path, name):
    """Student, teacher, projections, top-k capture, batches and every tensor the loss creates
    live on the job's device: here meta, where a CPU tensor anywhere in a step fails the test."""
    cfg = TrainConfig(lr=1e-2, max_steps=2, batch_size=8, save_steps=1, log_steps=1, max_length=64, **CASES[name])
    with MetaAccelerator() as check:
        result = train(tiny_world.student, pairs(), cfg, tmp_path / "run", progress=False, device="meta",
                       teacher_path=tiny_world.teacher)
    assert result.finished and result.step == 2
    assert check.ops_on_meta > 100
    assert newest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000002"


def test_lora_batches_follow_the_model_wherever_it_was_placed(tiny_world):
    """A QLoRA student is placed by `device_map`; its batches go where its weights are (the
    bitsandbytes load itself needs CUDA and has not run here)."""
    from transformers import AutoTokenizer

    cfg = TrainConfig(max_length=64, lora=LoraConfig(enabled=True))
    place = placement("bf16", "meta")
    from distill.modeling import load_student

    model, tokenizer = load_student(tiny_world.student, cfg, place)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    examples = tokenize_pairs(AutoTokenizer.from_pretrained(tiny_world.student), pairs()[:4], 64)
    distiller = Distiller(cfg, tokenizer, None, TrainPaths(Path(".")), examples, place)
    batch = to_device(distiller.prepare(collate(examples, tokenizer.pad_token_id, [0, 1, 2, 3])), place.device)
    with MetaAccelerator():
        loss, *_ = distiller.loss(model, batch, n_target=10, grad_accum=1)
        loss.backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)


# -- real-size architectures -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_shapes_have_their_published_parameter_counts(name):
    model = meta_model(name, torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_student_setup_at_real_size(name):
    """What the train stage does to the student: float32 master weights for a full fine-tune,
    a bf16 base under float32 LoRA adapters on every attention projection, checkpointing on."""
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    place = placement("bf16", "meta")
    full = TrainConfig(gradient_checkpointing=True)
    model = prepare_student(meta_model(name, student_dtype(full, place)), full)
    assert checkpointed(model) and model.training and not model.config.use_cache
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == PUBLISHED[name]

    lora = TrainConfig(lora=LoraConfig(enabled=True, r=8), gradient_checkpointing=True)
    model = prepare_student(meta_model(name, student_dtype(lora, place)), lora)
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    # r·(in + out) per adapted projection: q and o are hidden -> hidden, k and v hidden -> kv
    expected = layers * 8 * ((hidden + hidden) * 2 + (hidden + kv) * 2)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if not p.requires_grad} == {torch.bfloat16}
    assert checkpointed(model)


def test_teacher_setup_at_real_size():
    teacher = freeze(meta_model("qwen2.5-7b", placement("bf16", "meta").dtype))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert output_head(teacher).weight.shape == (152064, 3584)


def test_a_loss_step_at_real_size_on_the_device():
    """Forward and backward of the chunked loss on the 1.5B shape at its 151,936-row vocabulary,
    with gradient checkpointing, every tensor on the model's device."""
    cfg = TrainConfig(gradient_checkpointing=True, loss_chunk=64, max_length=96)
    place = placement("bf16", "meta")
    model = prepare_student(meta_model("qwen2.5-1.5b", student_dtype(cfg, place)), cfg)
    examples = [{"input_ids": list(range(100, 196)), "labels": [-100] * 30 + list(range(130, 196))},
                {"input_ids": list(range(5, 70)), "labels": [-100] * 20 + list(range(25, 70))}]
    tokenizer = type("Vocab", (), {"__len__": lambda self: 151_665})()  # Qwen2.5's real vocabulary
    distiller = Distiller(cfg, tokenizer, None, TrainPaths(Path(".")), examples, place)
    batch = to_device(distiller.prepare(collate(examples, 0, [0, 1])), place.device)
    with MetaAccelerator():
        loss, *_ = distiller.loss(model, batch, n_target=111, grad_accum=1)
        loss.backward()
    head = output_head(model).weight
    assert head.grad is not None and head.grad.shape == (151_936, 1536)  # tied: the embedding's gradient
    assert all(p.grad is not None for p in model.parameters())


def test_packed_batches_on_the_device(tiny_world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_world.student)
    examples = tokenize_pairs(tok, pairs()[:6], 64)
    batch = to_device(pack(examples, tok.pad_token_id, 128, list(range(6))), torch.device("meta"))
    assert {v.device.type for v in batch.values() if isinstance(v, torch.Tensor)} == {"meta"}


def test_gpu_check_runs_here_and_says_what_it_skipped(tmp_path):
    """`make gpu-check` on a machine without CUDA: the CPU rows pass, the CUDA rows say why
    they did not run, and the exit status is 0."""
    from tests.conftest import run_python

    proc = run_python("import sys; from distill.__main__ import main; "
                      f"sys.exit(main(['gpu-check', '--out', {str(tmp_path)!r}]))",
                      timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["check"]: r for r in json.loads((tmp_path / "gpu-check.json").read_text())}
    assert rows["sft, kill and resume (checkpointing on)"]["status"] == "pass"
    assert "resumed to step 60" in rows["sft, kill and resume (checkpointing on)"]["detail"]
    for name in ("kd forward_kl online", "kd offline top-20", "ekd top 20% by teacher entropy", "context", "feature",
                 "lora (base in the compute dtype)", "generation: transformers",
                 "qlora: train, merge, reload"):  # bitsandbytes' 4-bit layers run on the CPU
        assert rows[name]["status"] == "pass", rows[name]
    vllm = rows["generation: vLLM, logprobs"]
    if importlib.util.find_spec("vllm") is None:
        assert vllm["status"] == "skip" and vllm["detail"] == "vllm is not installed"
    else:
        assert vllm["status"] == "pass", vllm
    if not torch.cuda.is_available():
        for name in ("chunked loss at V 151,936, L 4096", "generation: vLLM, tensor parallel 2"):
            assert rows[name]["status"] == "skip" and rows[name]["detail"] == "no CUDA device"
    assert "| check | status |" in proc.stdout and (tmp_path / "gpu-check.md").exists()


def test_bf16_on_a_cpu_without_bf16_instructions_is_kept_with_a_warning(monkeypatch, caplog):
    from distill import device as devices

    assert devices.cpu_has_bf16("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n")
    assert devices.cpu_has_bf16("flags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert not devices.cpu_has_bf16("flags : fpu avx2 avx512f\n") and not devices.cpu_has_bf16("")
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="distill.device"):
        assert devices.resolve_precision("bf16", torch.device("cpu")) == "bf16"
        assert devices.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert [r.message for r in caplog.records if "emulated" in r.message] and len(caplog.records) == 1
