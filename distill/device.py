"""One device decision per job, and the numeric precision that goes with it.

A job uses the GPU it was given (`cuda:$LOCAL_RANK`) when there is one, else the CPU; every stage
takes the device from here, so the student, the teacher, the batches and every tensor a loss
creates live in one place. `train.precision: auto` means bf16 autocast where the GPU supports it
(Ampere and newer), fp16 autocast with loss scaling on older GPUs (V100), and float32 on the CPU.
An explicit bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX) is honoured with a
warning: there torch and vLLM emulate it, several times slower than float32.

Under bf16/fp16 the weights that are trained stay in float32 (the optimizer's master copy) and
the matrix products run in the low precision; frozen weights (a LoRA base, the teacher) are
stored in the low precision. Checks that need the job's hardware (bitsandbytes for QLoRA, bf16 support,
flash-attention) run here, at job start, not when the config is loaded on a login node.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distill.errors import DistillError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
log = logging.getLogger(__name__)


def job_device() -> torch.device:
    """This process's accelerator: the GPU of its local rank when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    """Where a job's models and tensors live, and in which precision they compute."""

    device: torch.device
    precision: str  # bf16 | fp16 | fp32

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: matrix products, frozen weights, the teacher, saved models."""
        return DTYPES[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32" or self.device.type not in ("cuda", "cpu"):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (its gradients underflow without it); a no-op otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        return f"{name} ({self.device}), {self.precision}"


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` made concrete for `device`; an explicit choice the device cannot honour is refused."""
    cuda = device.type == "cuda"
    bf16_ok = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "auto":
        return ("bf16" if bf16_ok else "fp16") if cuda else "fp32"
    if precision == "bf16" and cuda and not bf16_ok:
        raise DistillError(f"train.precision: bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                           "use fp16 (or auto)")
    if precision == "fp16" and not cuda:
        raise DistillError("train.precision: fp16 needs a CUDA GPU (loss scaling on the CPU is not supported); "
                           "use fp32 or bf16 here (or auto)")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        log.warning("bf16 on a CPU without AVX512-BF16 or AMX is emulated, several times slower than fp32 "
                    "(vLLM-CPU: 26 against 130 tokens/s on an AVX2 EPYC); auto (fp32 on CPUs) is faster here")
    return precision


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bf16 instructions, read from /proc/cpuinfo's flags (False where absent)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def placement(precision: str = "auto", device: torch.device | str | None = None) -> Placement:
    """The job's placement; `device` overrides the automatic choice (tests, `gpu-check`)."""
    dev = torch.device(device) if device is not None else job_device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        # TF32 matrix products on Ampere and newer: float32 speed close to bf16 at float32 range.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Placement(dev, resolve_precision(precision, dev))


def check_training_hardware(quantize: str, attn_implementation: str, device: torch.device) -> None:
    """What a training job needs of its machine, checked when it starts (one line each)."""
    if quantize == "4bit":
        check_4bit(device)
    check_attention(attn_implementation, device)


def check_4bit(device: torch.device) -> None:
    """bitsandbytes' 4-bit layers run on CUDA and, from 0.49 on, on the CPU; nowhere else."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise DistillError("train.quantize: 4bit (QLoRA) needs bitsandbytes, which is not installed in this "
                           "environment (requirements.txt and env/environment.yml have it)")
    if device.type not in ("cuda", "cpu"):
        raise DistillError(f"train.quantize: 4bit (QLoRA): bitsandbytes has no 4-bit kernels for {device.type}; "
                           "run it on a CUDA GPU or the CPU, or use quantize: none")


def check_attention(attn_implementation: str, device: torch.device) -> None:
    if attn_implementation == "flash_attention_2":
        if device.type != "cuda":
            raise DistillError("models.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa here")
        if importlib.util.find_spec("flash_attn") is None:
            raise DistillError("models.attn_implementation: flash_attention_2 needs the flash-attn package, which is "
                               "not installed here; use sdpa")


# -- random number generators ---------------------------------------------------------------------


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator a training step draws from, the device's own included."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
