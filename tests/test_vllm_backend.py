"""The vLLM backend's request/response mapping, against a stand-in `vllm` module.

vLLM needs a GPU and a CUDA torch, so it is not installed here: these tests inject a fake
module into `sys.modules` whose LLM and SamplingParams record what they are given and return
RequestOutput-shaped objects (`.outputs[i].text/.token_ids/.finish_reason/.logprobs`).
"""

from __future__ import annotations

import logging
import sys
import types
from types import SimpleNamespace

import pytest

from distill.config import GenerationConfig
from distill.generation import SamplingSpec, TransformersBackend, VLLMBackend, generate_shard, load_backend
from distill.jsonl import read_jsonl


def _logprob(value: float) -> SimpleNamespace:
    return SimpleNamespace(logprob=value, rank=None, decoded_token=None)


class FakeLLM:
    instances: list[FakeLLM] = []

    def __init__(self, model: str, **kwargs):
        self.model, self.kwargs, self.calls = model, kwargs, []
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return SimpleNamespace(chat_template=None, name="fake-tokenizer")

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((list(prompts), params))
        outputs = []
        for p in prompts:
            samples = []
            for k in range(params.kwargs["n"]):
                ids = list(range(3 + k))
                # up to k+1 entries per position: the top k plus the sampled token
                lps = ([{7: _logprob(-2.0), 5: _logprob(-0.1), 9: _logprob(-3.0), 2: _logprob(-1.0)} for _ in ids]
                       if params.kwargs["logprobs"] else None)
                samples.append(SimpleNamespace(index=k, text=f"{p}->{k}", token_ids=ids, logprobs=lps,
                                               finish_reason="stop" if k == 0 else "length"))
            outputs.append(SimpleNamespace(prompt=p, outputs=samples))
        return outputs


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    FakeLLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_engine_options_and_sampling_params(fake_vllm):
    gen = GenerationConfig(backend="vllm", tensor_parallel_size=4, logprobs=25, gpu_memory_utilization=0.8)
    backend = load_backend("vllm", "some/model", gen)
    assert isinstance(backend, VLLMBackend) and backend.tokenizer.name == "fake-tokenizer"
    llm = FakeLLM.instances[-1]
    assert llm.model == "some/model"
    # k > 20 needs the engine's max_logprobs raised, or vLLM rejects the request
    assert llm.kwargs == {"tensor_parallel_size": 4, "gpu_memory_utilization": 0.8, "max_logprobs": 25}
    backend.generate(["a"], SamplingSpec(n=2, temperature=0.7, top_p=0.9, max_new_tokens=5), seed=11)
    params = llm.calls[-1][1].kwargs
    assert params == {"n": 2, "temperature": 0.7, "top_p": 0.9, "max_tokens": 5, "seed": 11, "logprobs": 25}

    load_backend("vllm", "m", GenerationConfig(backend="vllm", logprobs=20))
    assert "max_logprobs" not in FakeLLM.instances[-1].kwargs
    plain = load_backend("vllm", "m", GenerationConfig(backend="vllm"))
    plain.generate(["a"], SamplingSpec(), seed=0)
    params = FakeLLM.instances[-1].calls[-1][1].kwargs
    assert params["logprobs"] is None and params["temperature"] == 0 and params["n"] == 1


def test_outputs_map_to_completions_in_prompt_order(fake_vllm):
    backend = load_backend("vllm", "m", GenerationConfig(backend="vllm", logprobs=2))
    out = backend.generate(["p0", "p1"], SamplingSpec(n=2, temperature=1.0, max_new_tokens=4), seed=0)
    assert [[c.text for c in cs] for cs in out] == [["p0->0", "p0->1"], ["p1->0", "p1->1"]]
    first, second = out[0]
    assert (first.n_tokens, first.finished, second.n_tokens, second.finished) == (3, True, 4, False)
    # the k best of the k+1 entries, best first
    assert first.top_logprobs == [[[5, -0.1], [2, -1.0]]] * 3


def test_shard_records_carry_top_logprobs(fake_vllm, tmp_path):
    backend = load_backend("vllm", "m", GenerationConfig(backend="vllm", logprobs=1))
    out = tmp_path / "shard.jsonl"
    tasks = [{"id": f"q{i}", "prompt": f"Q{i}", "gold": "1"} for i in range(3)]
    stats = generate_shard(backend, tasks, out, SamplingSpec(n=1, max_new_tokens=4), batch_size=2, progress=False)
    records = read_jsonl(out)
    assert [r["response"] for r in records] == ["Q0->0", "Q1->0", "Q2->0"]
    assert records[0]["top_logprobs"] == [[[5, -0.1]]] * 3 and stats["new_tokens"] == 9


def test_without_vllm_the_transformers_backend_is_used_with_a_warning(tiny_world, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with caplog.at_level(logging.WARNING, logger="distill.generation"):
        backend = load_backend("vllm", tiny_world.teacher, GenerationConfig(backend="vllm"))
    assert isinstance(backend, TransformersBackend)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["generation.backend is vllm but vllm is not installed here: using transformers instead"]


def test_pipeline_stages_pass_the_engine_options_from_the_config(fake_vllm, tiny_world, tmp_path):
    from distill import pipeline
    from distill.config import load_config

    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"),
                      ["generation.backend=vllm", "generation.tensor_parallel_size=2", "generation.logprobs=30"])
    assert isinstance(pipeline._load_backend(cfg, cfg.models.teacher), VLLMBackend)
    assert FakeLLM.instances[-1].kwargs["tensor_parallel_size"] == 2
    assert FakeLLM.instances[-1].kwargs["max_logprobs"] == 30
