"""The vLLM backend's settings where no real engine can show them: on a GPU. Everything else
about the backend, tensor parallelism on the CPU included, runs on the real engine
(tests/test_vllm_engine.py).

A CUDA device cannot be had here, so `engine_kwargs` is asked what it would pass to `LLM(...)`
with the job's device set to a GPU; the arguments for this machine's CPU are checked on the
real engine. Where vllm is not installed, the transformers backend stands in with a warning.
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from distill import device as devices
from distill.config import load_config
from distill.generation import Engine, TransformersBackend, VLLMBackend, engine_for, load_backend


@pytest.fixture
def on_a_gpu(monkeypatch):
    """The job's device reported as an Ampere GPU (bf16)."""
    monkeypatch.setattr(devices, "job_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(devices, "resolve_precision", lambda p, d: "bf16" if p == "auto" else p)


def test_on_a_gpu_the_engine_takes_a_share_of_the_gpu_and_keeps_chunked_prefill(on_a_gpu):
    kwargs = VLLMBackend.engine_kwargs(Engine("vllm", tensor_parallel_size=4, gpu_memory_utilization=0.8, logprobs=25))
    # k > 20 needs the engine's max_logprobs raised, or vLLM rejects the request
    assert kwargs == {"tensor_parallel_size": 4, "dtype": "bfloat16", "gpu_memory_utilization": 0.8, "max_logprobs": 25}
    sized = VLLMBackend.engine_kwargs(Engine("vllm", kv_cache_gib=20, dtype="fp16"))
    assert sized == {"tensor_parallel_size": 1, "dtype": "float16", "kv_cache_memory_bytes": 20 * 2**30}


def test_on_this_cpu_the_engine_gets_a_kv_cache_size_and_no_chunked_prefill():
    kwargs = VLLMBackend.engine_kwargs(Engine("vllm", gpu_memory_utilization=0.9, logprobs=5))
    assert kwargs == {"tensor_parallel_size": 1, "dtype": "float32", "kv_cache_memory_bytes": 2**30,
                      "enable_chunked_prefill": False, "enforce_eager": True}


def test_each_role_gets_its_engine_settings_from_the_config(tiny_world, tmp_path, on_a_gpu):
    """The student (mining, evaluation) does not inherit the teacher's tensor parallelism or
    logprobs; the teacher's own evaluation keeps its GPUs but captures no logprobs."""
    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"),
                      ["generation.backend=vllm", "generation.tensor_parallel_size=8", "generation.logprobs=30",
                       "generation.dtype=bf16", "eval.tensor_parallel_size=1", "eval.gpu_memory_utilization=0.5",
                       "eval.kv_cache_gib=4"])
    teacher, scoring, student = engine_for(cfg, "teacher"), engine_for(cfg, "teacher", logprobs=False), \
        engine_for(cfg, "student")
    assert (teacher.tensor_parallel_size, teacher.logprobs, teacher.dtype) == (8, 30, "bf16")
    assert (scoring.tensor_parallel_size, scoring.logprobs) == (8, 0)
    assert (student.backend, student.tensor_parallel_size, student.logprobs, student.gpu_memory_utilization,
            student.dtype, student.kv_cache_gib) == ("vllm", 1, 0, 0.5, "bf16", 4)
    assert VLLMBackend.engine_kwargs(teacher) == {"tensor_parallel_size": 8, "dtype": "bfloat16",
                                                  "gpu_memory_utilization": 0.9, "max_logprobs": 30}


def test_cpu_workers_get_disjoint_shares_of_the_jobs_cpus(monkeypatch):
    import os

    from distill.errors import DistillError
    from distill.generation import cpu_worker_binding

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7, 0, 1})
    assert cpu_worker_binding(2) == "0,1,4|5,6,7"
    assert cpu_worker_binding(3) == "0,1|4,5|6,7"
    with pytest.raises(DistillError, match="tensor_parallel_size 8 on the CPU needs a CPU per worker; this job has 6"):
        cpu_worker_binding(8)


def test_without_vllm_the_transformers_backend_is_used_with_a_warning(tiny_world, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with caplog.at_level(logging.WARNING, logger="distill.generation"):
        backend = load_backend(Engine(backend="vllm"), tiny_world.teacher)
    assert isinstance(backend, TransformersBackend)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["generation.backend is vllm but vllm is not installed here: using transformers instead"]


def test_the_demo_and_test_models_have_head_sizes_vllms_cpu_attention_runs(tiny_world):
    import json

    from distill.tiny import STUDENT_SHAPE, TEACHER_SHAPE, VLLM_CPU_HEAD_SIZES
    from tests.conftest import ROOT

    for shape in (TEACHER_SHAPE, STUDENT_SHAPE):
        assert shape["hidden_size"] // shape["num_heads"] in VLLM_CPU_HEAD_SIZES
    for path in (ROOT / "models" / "tiny" / "teacher", ROOT / "models" / "tiny" / "student", tiny_world.teacher,
                 tiny_world.student):
        config = json.loads((path / "config.json").read_text())
        assert config["hidden_size"] // config["num_attention_heads"] in VLLM_CPU_HEAD_SIZES, path
