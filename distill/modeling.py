"""Loading, preparing and saving models on the job's device.

Every model is loaded straight onto its device (`device_map`), never first into host memory as a
whole: a 30B-A3B teacher in bf16 is about 61 GB, as much as a typical GPU job's host memory. The
student's setup (gradient checkpointing, LoRA) is a separate step, `prepare_student`, so tests
can apply it to real-size architectures built on the meta device without any weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from distill.device import Placement
from distill.errors import DistillError
from distill.train_config import TrainConfig

log = logging.getLogger(__name__)
PROJECTIONS = "distill_projections"
# A teacher larger than this share of the GPU's free memory is spread over the visible GPUs
# (`device_map="auto"`): the rest is for the student, its optimizer and activations.
TEACHER_SHARE = 0.5


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | Path, *, dtype: torch.dtype, device_map: Any, attn_implementation: str,
                   quantization_config: Any = None) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device_map, "attn_implementation": attn_implementation}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def student_dtype(cfg: TrainConfig, place: Placement) -> torch.dtype:
    """float32 where the weights are trained in full (the optimizer's master copy), the compute
    dtype where they stay frozen under adapters (LoRA, QLoRA's non-quantized layers)."""
    return place.dtype if cfg.lora.enabled else torch.float32


def load_student(path: str | Path, cfg: TrainConfig, place: Placement,
                 attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """The student on the job's device, in `student_dtype` (4-bit NF4 for QLoRA), ready to train."""
    tokenizer = load_tokenizer(path)
    device_map = {"": place.device}
    if cfg.quantize == "4bit":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=place.dtype)
        model = load_causal_lm(path, dtype=place.dtype, device_map=device_map, attn_implementation=attn_implementation,
                               quantization_config=quant)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_layout(model)
    else:
        model = load_causal_lm(path, dtype=student_dtype(cfg, place), device_map=device_map,
                               attn_implementation=attn_implementation)
    return prepare_student(model, cfg), tokenizer


def keep_4bit_layout(model: Any) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel. On CPUs with
    AVX512-BF16 a forward in eval mode without gradients rewrites each `Linear4bit` weight in
    place, after which training the adapters above it fails ("a view of a leaf Variable that
    requires grad is being used in an in-place operation"); a student is for training, so it
    keeps the layout it was quantised in (GPUs have no such repacking)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def prepare_student(model: Any, cfg: TrainConfig) -> Any:
    """Training-time setup of a loaded student: no KV cache, gradient checkpointing, LoRA."""
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing: works with frozen embeddings (LoRA) without forcing
        # gradients onto the inputs.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.20 on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
        # The adapters start from the run's seed: a rerun, or a resume that rebuilds them before
        # loading the checkpoint, starts where the first run did (the caller's RNG is left as it was).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = get_peft_model(model, lora)  # adapters in float32 whatever the base's dtype
    model.train()
    return model


def output_head(model: Any) -> torch.nn.Linear:
    """The LM head, which the loss runs itself (chunked): a plain Linear."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise DistillError(f"the model's output head is a {type(head).__name__}, not a plain Linear layer; "
                           "the chunked loss needs its weight (is lm_head a LoRA target?)")
    return head


def decoder(model: Any) -> Any:
    """The transformer under the LM head (`model.model` for Qwen, Llama and most others)."""
    return model.get_decoder()


def device_map_for(path: str | Path, place: Placement, share: float = TEACHER_SHARE, spread: bool = True) -> Any:
    """The model on the job's GPU when its weights fit in `share` of the GPU's free memory,
    else spread over every visible GPU (and the CPU, if it must) by accelerate; always on the
    job's GPU without `spread` (one of several training processes, each with its GPU)."""
    if place.device.type != "cuda" or not spread:
        return {"": place.device}
    need = weight_bytes(path, place.dtype)
    free, _ = torch.cuda.mem_get_info(place.device)
    if need <= share * free:
        return {"": place.device}
    log.warning("%s: %.1f GB of weights in %s do not fit in %.0f%% of the %.1f GB free on %s; "
                "spreading it over %d GPU(s) with device_map=auto", path, need / 1e9, place.dtype,
                100 * share, free / 1e9, place.device, torch.cuda.device_count())
    return "auto"


def weight_bytes(path: str | Path, dtype: torch.dtype) -> int:
    """Bytes of a checkpoint's weights once loaded in `dtype`, from its safetensors headers."""
    from safetensors import safe_open

    numel = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                numel += int(torch.Size(st.get_slice(name).get_shape()).numel())
    return numel * torch.empty((), dtype=dtype).element_size()


def load_teacher(path: str | Path, place: Placement, attn_implementation: str = "sdpa", spread: bool = True) -> Any:
    """The teacher in the compute dtype, frozen, in eval mode, placed by `device_map_for`."""
    teacher = load_causal_lm(path, dtype=place.dtype, device_map=device_map_for(path, place, spread=spread),
                             attn_implementation=attn_implementation)
    return freeze(teacher)


def freeze(model: Any) -> Any:
    """Inference only: eval mode (no dropout) and no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


# -- saving ---------------------------------------------------------------------------------------


def save_final(model: Any, tokenizer: Any, out_dir: Path, *, dtype: torch.dtype, base_path: str | Path | None = None,
               quantized: bool = False) -> Path:
    """A plain `from_pretrained`-loadable model (LoRA merged) in `dtype`, the format vLLM
    loads; renamed into place when complete.

    A 4-bit student is not merged in place (that would re-quantize the merged weights and lose
    part of the update): its adapter is saved, the base is reloaded in `dtype` and the adapter
    merged into that (`merge_adapter`).
    """
    if hasattr(model, PROJECTIONS):  # feature distillation's projections are not part of the student
        delattr(model, PROJECTIONS)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    adapter = out_dir.with_name(f".tmp-{out_dir.name}-adapter-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if quantized:
            model.save_pretrained(str(adapter))
            merge_adapter(base_path, adapter, tmp, dtype=dtype)
        else:
            if hasattr(model, "merge_and_unload"):
                model = model.merge_and_unload()
            model.to(dtype)
            model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back at once
        raise
    finally:
        shutil.rmtree(adapter, ignore_errors=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def merge_adapter(base_path: str | Path | None, adapter_dir: Path, out_dir: Path, *, dtype: torch.dtype) -> Path:
    """Base weights reloaded in `dtype` on the CPU, the LoRA adapter applied and merged, saved."""
    from peft import PeftModel

    if base_path is None:
        raise DistillError("merging a LoRA adapter needs the base model's path")
    base = load_causal_lm(base_path, dtype=dtype, device_map={"": "cpu"}, attn_implementation="sdpa")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir))
    return out_dir


def saved_dtype(model_dir: str | Path) -> str | None:
    """The dtype a saved model declares in its config.json."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype")
