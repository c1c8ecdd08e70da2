"""`distill plan`: per-GPU memory from config.json alone, held to what torch really keeps.

The activation formula is checked against the tensors autograd saves in a real Qwen2 layer, the
whole training estimate against a measured training run of distill's own loop, and the verdicts
on the published Qwen2.5-1.5B and 7B shapes (tests/data/hf-configs) against the well-known
figures: a full fine-tune takes 16 bytes per parameter before activations.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.__main__ import main
from distill.memory import (
    GB,
    Gpu,
    Setup,
    compute_bytes,
    gpu_type,
    layer_activation_bytes,
    parse_gres,
    read_shape,
    train_memory,
)
from distill.train_config import LoraConfig, TrainConfig
from tests.conftest import ROOT

HF = Path(__file__).parent / "data" / "hf-configs"
RUN = "tests/data/hf-configs/qwen2.5-1.5b-from-7b.yaml"  # the README's example, paths from the project root
PUBLISHED = {"qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512}  # parameters, from the model cards
H100 = Gpu("H100", 80)


def config(tmp_path: Path, student: str, teacher: str = "qwen2.5-7b", extra: str = "") -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(f"name: p\nmodels: {{teacher: {HF / teacher}, student: {HF / student}}}\n"
                    f"data: {{benchmark: gsm8k}}\n{extra}")
    return path


def test_parameter_counts_come_out_as_published_and_adapters_as_peft_makes_them():
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    for name, params in PUBLISHED.items():
        shape = read_shape(str(HF / name))
        assert shape.params == params
        assert shape.tied == (name == "qwen2.5-1.5b")
    shape = read_shape(str(HF / "qwen2.5-1.5b"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(HF / "qwen2.5-1.5b"))
    targets = ["q_proj", "v_proj", "down_proj"]
    peft = get_peft_model(model, PeftLora(r=16, target_modules=targets, task_type="CAUSAL_LM"))
    assert shape.lora_params(targets, 16) == sum(p.numel() for p in peft.parameters() if p.requires_grad)


def saved_bytes_per_layer(tmp_path: Path, precision: str, lora: bool) -> tuple[int, int, object, TrainConfig]:
    """Bytes of the tensors autograd saves in the middle layer of a 3-layer Qwen2 (padded batch
    of 2 × 40 tokens), parameters left out, and the tokens."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from distill.modeling import prepare_student

    shape = dict(vocab_size=300, hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                 intermediate_size=224, tie_word_embeddings=True)
    Qwen2Config(**shape).save_pretrained(tmp_path)
    cfg = TrainConfig(lora=LoraConfig(enabled=lora, r=4))
    dtype = torch.bfloat16 if lora and precision == "bf16" else torch.float32  # distill.modeling.student_dtype
    torch.manual_seed(0)
    model = prepare_student(AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=dtype,
                                                             attn_implementation="sdpa"), cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where, seen = ["before"], {}
    layers = model.get_decoder().layers
    for k, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, k=k: where.__setitem__(0, k))
        layer.register_forward_hook(lambda m, a, o: where.__setitem__(0, "after"))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = (where[0], storage.nbytes())
        return t

    ids = torch.randint(0, 300, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 33:] = 0  # padded, as distill's batches are
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
    return sum(n for k, n in seen.values() if k == 1), 80, read_shape(str(tmp_path)), cfg


@pytest.mark.parametrize("precision,lora", [("fp32", False), ("bf16", False), ("bf16", True), ("fp32", True)])
def test_the_activation_formula_is_what_autograd_saves_in_a_qwen2_layer(tmp_path, precision, lora):
    saved, tokens, shape, cfg = saved_bytes_per_layer(tmp_path, precision, lora)
    setup = Setup.from_config(cfg, precision)
    c = compute_bytes(precision)
    # autocast's low-precision copies of the weights are saved too: counted as weight copies
    if lora:
        copies = c * shape.lora_params(cfg.lora.target_modules, cfg.lora.r) // shape.layers if c < 4 else 0
    else:
        copies = c * shape.linear // shape.layers if c < 4 else 0
    per_token = layer_activation_bytes(shape, length=40, precision=precision, mode=setup.mode,
                                       lora_targets=setup.lora_targets, r=setup.lora_r)
    assert saved == tokens * per_token + copies


def test_a_full_fine_tune_of_7b_takes_16_bytes_a_parameter_and_needs_fsdp_over_8_gpus():
    shape = read_shape(str(HF / "qwen2.5-7b"))
    cfg = TrainConfig(gradient_checkpointing=True)
    one = train_memory(shape, Setup.from_config(cfg, "bf16"))
    parts = one["parts"]
    assert parts["weights"] + parts["gradients"] + parts["optimizer"] == 16 * shape.params  # ≈ 122 GB
    assert one["peak"] > 120 * GB
    fsdp = train_memory(shape, Setup.from_config(cfg, "bf16", world_size=8, strategy="fsdp"))
    assert fsdp["parts"]["weights"] + fsdp["parts"]["gradients"] + fsdp["parts"]["optimizer"] == 2 * shape.params
    assert fsdp["parts"]["activations"] == one["parts"]["activations"]  # not sharded
    assert fsdp["peak"] + 2**30 < H100.bytes < one["peak"]
    ddp = train_memory(shape, Setup.from_config(cfg, "bf16", world_size=8, strategy="ddp"))
    assert ddp["peak"] >= one["peak"]  # replicated, plus DDP's gradient buckets


def test_lora_fits_one_gpu_and_qlora_takes_less_than_lora():
    shape = read_shape(str(HF / "qwen2.5-7b"))
    lora = TrainConfig(lora=LoraConfig(enabled=True), gradient_checkpointing=True)
    qlora = TrainConfig(lora=LoraConfig(enabled=True), quantize="4bit", gradient_checkpointing=True)
    a = train_memory(shape, Setup.from_config(lora, "bf16"))
    b = train_memory(shape, Setup.from_config(qlora, "bf16"))
    assert a["peak"] + 2**30 < H100.bytes
    assert b["peak"] < a["peak"] and b["parts"]["weights"] < a["parts"]["weights"] / 1.8
    assert a["trained_params"] == b["trained_params"] == shape.lora_params(lora.lora.target_modules, 8)
    assert a["parts"]["optimizer"] == 8 * a["trained_params"]


def test_checkpointing_keeps_one_hidden_state_per_layer():
    shape = read_shape(str(HF / "qwen2.5-1.5b"))
    off = train_memory(shape, Setup.from_config(TrainConfig(batch_size=8, max_length=2048), "bf16"))
    on = train_memory(shape, Setup.from_config(TrainConfig(batch_size=8, max_length=2048,
                                                           gradient_checkpointing=True), "bf16"))
    assert on["parts"]["activations"] == 28 * 8 * 2048 * 1536 * 4  # float32 residual stream of a full fine-tune
    assert off["parts"]["activations"] > 20 * on["parts"]["activations"]
    assert on["peak"] < off["peak"]


def test_an_online_teacher_is_counted_and_an_offline_one_only_while_it_captures():
    student, teacher = read_shape(str(HF / "qwen2.5-1.5b")), read_shape(str(HF / "qwen2.5-7b"))
    online = TrainConfig(objective="kd", gradient_checkpointing=True)
    offline = TrainConfig(objective="kd", gradient_checkpointing=True)
    offline.kd.teacher = "offline"
    a = train_memory(student, Setup.from_config(online, "bf16"), teacher)
    b = train_memory(student, Setup.from_config(offline, "bf16"), teacher)
    assert a["parts"]["teacher"] == 2 * teacher.params  # bf16, no gradients, no optimizer
    assert b["parts"]["teacher"] == 0 and b["phases"]["teacher capture"] > 2 * teacher.params
    assert b["peak"] < a["peak"]


def test_gres_names_the_gpu_and_its_memory():
    assert parse_gres("gpu:H100:2") == ("H100", 2)
    assert parse_gres("gpu:4") == (None, 4) and parse_gres("gpu:a100") == ("a100", 1)
    assert parse_gres("shard:2,gpu:L40S:1") == ("L40S", 1) and parse_gres(None) == (None, 0)
    assert gpu_type("H100") == (80, "") and gpu_type("h200") == (141, "") and gpu_type("L40S") == (48, "")
    assert gpu_type("a100-40") == (40, "") and gpu_type("A100_40GB") == (40, "") and gpu_type("v100-16") == (16, "")
    assert gpu_type("a100-80") == (80, "")
    gb, note = gpu_type("A100")
    assert gb == 80 and "80 GB model" in note
    gb, note = gpu_type("V100")
    assert gb == 32 and "32 GB model" in note
    gb, note = gpu_type("mi300x")
    assert gb == 80 and "unknown GPU type" in note



def test_the_gpus_a_profile_gives_each_section(tmp_path):
    from jobs.cluster import load_profile, profile_world, section_gpus

    path = tmp_path / "p.yaml"
    path.write_text("gres: 'gpu:A100:4'\nstages: {train: {gres: 'gpu:h200:4'}}\ngpus_per_node: 4\nnodes: 2\n")
    profile = load_profile(path)
    gpus, notes = section_gpus(profile, ["train"])
    gpu = gpus["train"]
    assert (gpu.name, gpu.gb, gpu.count, profile_world(profile)) == ("h200", 141, 4, 8) and notes == []
    path.write_text("cpus: 4\n")
    profile = load_profile(path)
    gpus, notes = section_gpus(profile, ["generate"])
    assert gpus == {"generate": None} and profile_world(profile) is None
    assert notes == [f"{path}: gres: not set; assumed 80 GB"]


def verdicts(out: str) -> list[str]:
    """The training table's verdicts: checkpointing off, on."""
    line = next(line for line in out.splitlines() if line.startswith("on H100, 80 GB"))
    return [v.strip() for v in line[len("on H100, 80 GB"):].split(")")[:2]]


def test_the_plan_of_a_1_5b_and_a_7b_student(capsys, monkeypatch):
    """The README's tables: Qwen2.5-1.5B and 7B students of a 7B teacher on an H100."""
    monkeypatch.chdir(ROOT)
    assert main(["plan", "--config", RUN, "--cluster", "pace"]) == 0
    out = capsys.readouterr().out
    assert "1.54B parameters" in out and "GPU: H100, 80 GB (configs/cluster/pace.yaml stages.train.gres" in out
    off, on = verdicts(out)  # 8 × 2048 tokens of a full fine-tune: only with checkpointing
    assert off.startswith("does not fit") and on.startswith("fits")
    assert [line.split()[0] for line in out.splitlines()[-5:-2]] == ["generate", "evaluate,", "evaluate"]
    seven = ["--config", RUN, "--set", f"models.student={HF / 'qwen2.5-7b'}",
             "--set", "train.gradient_checkpointing=true"]
    assert main(["plan", *seven, "--gpu", "H100"]) == 0
    out = capsys.readouterr().out
    assert "7.62B parameters" in out and all(v.startswith("does not fit") for v in verdicts(out))
    assert main(["plan", *seven, "--gpu", "H100", "--world-size", "8", "--strategy", "fsdp"]) == 0
    out = capsys.readouterr().out
    assert "training on FSDP over 8 GPUs" in out and verdicts(out)[1].startswith("fits")
    assert main(["plan", *seven, "--gpu", "H100", "--set", "train.lora.enabled=true"]) == 0
    assert verdicts(capsys.readouterr().out)[1].startswith("fits")


def test_json_output_is_bytes_per_stage(tmp_path, capsys):
    path = config(tmp_path, "qwen2.5-1.5b", extra="train: {lora: {enabled: true}}\n")
    assert main(["plan", "--config", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["student"]["params"] == PUBLISHED["qwen2.5-1.5b"]
            and data["teacher"]["params"] == PUBLISHED["qwen2.5-7b"])
    train = data["train"]
    assert train["checkpointing"] == "off" and train["precision"] == "bf16"
    for column in ("off", "on"):
        assert train[column]["fits"] is True and train[column]["need"] == train[column]["peak"] + 2**30
        assert train[column]["parts"]["weights"] == 2 * PUBLISHED["qwen2.5-1.5b"] + 4 * train[column]["adapter_params"]
    assert set(data["stages"]) == {"generate", "evaluate, mine", "evaluate (iteration 0)"}
    assert data["gpus"]["train"]["gb"] == 80


def test_a_model_without_config_json_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    path = tmp_path / "run.yaml"
    path.write_text(f"name: p\nmodels: {{teacher: {HF / 'qwen2.5-7b'}, student: {tmp_path / 'empty'}}}\n"
                    "data: {benchmark: gsm8k}\n")
    assert main(["plan", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {path}: models.student: {tmp_path / 'empty'}: no config.json there (the plan reads only "
                   "a model's config.json)")
    path.write_text("name: p\nmodels: {teacher: Qwen/No-Such-Model-Here, student: Qwen/No-Such-Model-Here}\n"
                    "data: {benchmark: gsm8k}\n")
    assert main(["plan", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert (len(err.splitlines()) == 1
            and "models.student: Qwen/No-Such-Model-Here: no such directory, and no config.json" in err)


@pytest.mark.slow
def test_the_training_estimate_is_within_25_percent_of_a_measured_run(tmp_path):
    """distill's training loop on a 19M-parameter Qwen2 (16k vocabulary), fp32 on the CPU,
    a full fine-tune with fused AdamW: the estimate against the peak resident memory of the
    process (bench/plan_accuracy.py has both sizes and checkpointing on)."""
    from bench.plan_accuracy import build, estimate, measure

    model = build("20M", tmp_path / "20M")
    plan = estimate(model, "20M", checkpointing=False)
    measured = measure(model, "20M", False, tmp_path / "run")
    assert abs(plan["peak"] / measured - 1) <= 0.25, (plan["peak"], measured)


def test_the_driver_refuses_a_stage_that_cannot_fit_and_names_the_numbers(tmp_path, monkeypatch):
    """What `distill plan` says does not fit is not submitted: one line with the numbers and the
    profile key, before anything queues; --no-plan-check (plan_check=False) submits anyway."""
    from distill import pipeline
    from distill.config import load_config
    from distill.errors import DistillError
    from jobs.cluster import load_profile
    from jobs.driver import Driver

    monkeypatch.chdir(ROOT)
    path = tmp_path / "gpus.yaml"
    path.write_text("stages:\n  train: {gres: 'gpu:H100:1'}\n  generate: {gres: 'gpu:V100:1'}\n"
                    "  evaluate: {gres: 'gpu:H100:1'}\n")
    profile = load_profile(path)

    def check(*stages: str, sets: tuple[str, ...] = (), plan_check: bool = True, teacher_eval: bool = False) -> None:
        driver = Driver(load_config(RUN, [f"run_root={tmp_path / 'runs'}", *sets]), "local", profile,
                        plan_check=plan_check)
        driver.kind = "slurm"  # what the profile says is checked, not whether this machine has sbatch
        driver.check_memory([pipeline.stage(s) for s in stages], teacher_eval)

    # Qwen2.5-1.5B, full fine-tune, 8 x 2048 tokens without checkpointing: over an H100's 80 GB.
    with pytest.raises(DistillError) as refused:
        check("train")
    line = str(refused.value)
    assert "\n" not in line and line.startswith(f"{path}: stages.train.gres: training needs ")
    need = float(line.split("training needs ")[1].split()[0])
    assert 80 < need < 90 and "activations" in line and "on H100, 80 GB:" in line
    assert "with train.gradient_checkpointing: true it needs " in line and "--no-plan-check" in line
    assert not (tmp_path / "runs").exists()
    check("train", sets=("train.gradient_checkpointing=true",))  # 27 GB: fits
    check("train", plan_check=False)
    check("evaluate", "verify")  # the 1.5B student's evaluation fits; verify has no GPU
    # The 7B teacher generates with transformers on a V100 (taken as the 32 GB one; fp16): 15 GB
    # of weights, and the KV cache and prefill of 16 x 4 sequences (undo.n) do not fit beside them.
    with pytest.raises(DistillError, match=rf"^{path}: stages.generate.gres: generate \(teacher\) needs [\d.]+ GB a "
                                           r"GPU \(prefill [\d.]+, weights 15.23, kv cache [\d.]+, CUDA context "
                                           r"1.07\) on V100, 32 GB: [\d.]+ GB over"):
        check("generate")
    check("evaluate", teacher_eval=True)  # the teacher evaluated on an H100 in iteration 0 fits
