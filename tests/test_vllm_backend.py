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

from distill.generation import (
    Engine,
    SamplingSpec,
    TransformersBackend,
    VLLMBackend,
    engine_for,
    generate_shard,
    load_backend,
)
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
    engine = Engine(backend="vllm", tensor_parallel_size=4, logprobs=25, gpu_memory_utilization=0.8)
    backend = load_backend(engine, "some/model")
    assert isinstance(backend, VLLMBackend) and backend.tokenizer.name == "fake-tokenizer"
    llm = FakeLLM.instances[-1]
    assert llm.model == "some/model"
    # k > 20 needs the engine's max_logprobs raised, or vLLM rejects the request
    assert llm.kwargs == {"tensor_parallel_size": 4, "gpu_memory_utilization": 0.8, "max_logprobs": 25}
    backend.generate(["a"], SamplingSpec(n=2, temperature=0.7, top_p=0.9, max_new_tokens=5), seed=11)
    params = llm.calls[-1][1].kwargs
    # every sampling field explicit: nothing comes from the model's generation_config.json
    assert params == {"n": 2, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.0, "max_tokens": 5, "seed": 11,
                      "logprobs": 25}

    load_backend(Engine(backend="vllm", logprobs=20), "m")
    assert "max_logprobs" not in FakeLLM.instances[-1].kwargs
    plain = load_backend(Engine(backend="vllm"), "m")
    plain.generate(["a"], SamplingSpec(), seed=0)
    params = FakeLLM.instances[-1].calls[-1][1].kwargs
    assert params["logprobs"] is None and params["temperature"] == 0 and params["n"] == 1


def test_outputs_map_to_completions_in_prompt_order(fake_vllm):
    backend = load_backend(Engine(backend="vllm", logprobs=2), "m")
    out = backend.generate(["p0", "p1"], SamplingSpec(n=2, temperature=1.0, max_new_tokens=4), seed=0)
    assert [[c.text for c in cs] for cs in out] == [["p0->0", "p0->1"], ["p1->0", "p1->1"]]
    first, second = out[0]
    assert (first.n_tokens, first.finished, second.n_tokens, second.finished) == (3, True, 4, False)
    # the k best of the k+1 entries, best first
    assert first.top_logprobs == [[[5, -0.1], [2, -1.0]]] * 3


def test_shard_records_carry_top_logprobs(fake_vllm, tmp_path):
    backend = load_backend(Engine(backend="vllm", logprobs=1), "m")
    out = tmp_path / "shard.jsonl"
    tasks = [{"id": f"q{i}", "prompt": f"Q{i}", "gold": "1"} for i in range(3)]
    stats = generate_shard(backend, tasks, out, SamplingSpec(n=1, max_new_tokens=4), batch_size=2, progress=False)
    records = read_jsonl(out)
    assert [r["response"] for r in records] == ["Q0->0", "Q1->0", "Q2->0"]
    assert records[0]["top_logprobs"] == [[[5, -0.1]]] * 3 and stats["new_tokens"] == 9


def test_without_vllm_the_transformers_backend_is_used_with_a_warning(tiny_world, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with caplog.at_level(logging.WARNING, logger="distill.generation"):
        backend = load_backend(Engine(backend="vllm"), tiny_world.teacher)
    assert isinstance(backend, TransformersBackend)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["generation.backend is vllm but vllm is not installed here: using transformers instead"]


def test_pipeline_stages_pass_the_engine_options_from_the_config(fake_vllm, tiny_world, tmp_path):
    from distill.config import load_config

    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"),
                      ["generation.backend=vllm", "generation.tensor_parallel_size=2", "generation.logprobs=30"])
    assert isinstance(load_backend(engine_for(cfg, "teacher"), cfg.models.teacher), VLLMBackend)
    assert FakeLLM.instances[-1].kwargs["tensor_parallel_size"] == 2
    assert FakeLLM.instances[-1].kwargs["max_logprobs"] == 30


def test_the_student_runs_with_its_own_engine_settings(fake_vllm, tiny_world, tmp_path):
    """Mining and evaluating the student do not inherit the teacher's tensor parallelism or
    logprobs; the teacher's own evaluation keeps its GPUs but captures no logprobs."""
    from distill.config import load_config
    from distill.jsonl import write_jsonl
    from distill.layout import RunPaths
    from tests.conftest import run_stage_unit

    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"),
                      ["generation.backend=vllm", "generation.tensor_parallel_size=8", "generation.logprobs=30",
                       "eval.tensor_parallel_size=1", "eval.gpu_memory_utilization=0.5", "eval.num_shards=1"])
    student = engine_for(cfg, "student")
    assert (student.backend, student.tensor_parallel_size, student.logprobs, student.gpu_memory_utilization) == \
        ("vllm", 1, 0, 0.5)
    run_stage_unit(cfg, 0, "evaluate", "teacher:0")
    assert FakeLLM.instances[-1].kwargs == {"tensor_parallel_size": 8, "gpu_memory_utilization": 0.9}
    assert FakeLLM.instances[-1].calls[-1][1].kwargs["logprobs"] is None
    paths = RunPaths(cfg.run_dir)
    write_jsonl(paths.train_data(0), [])
    run_stage_unit(cfg, 1, "mine")
    assert FakeLLM.instances[-1].model == str(paths.student(0))
    assert FakeLLM.instances[-1].kwargs == {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.5}


def test_vllm_gets_large_chunks_of_a_shard_per_call(fake_vllm, tmp_path):
    backend = load_backend(Engine(backend="vllm"), "m")
    tasks = [{"id": f"q{i}", "prompt": f"Q{i}", "gold": "1"} for i in range(2500)]
    generate_shard(backend, tasks, tmp_path / "shard.jsonl", SamplingSpec(max_new_tokens=4), batch_size=16,
                   progress=False)
    assert [len(prompts) for prompts, _ in FakeLLM.instances[-1].calls] == [1024, 1024, 452]
    assert len(read_jsonl(tmp_path / "shard.jsonl")) == 2500


FAKE_VLLM_MODULE = r"""
import json, os
from types import SimpleNamespace

class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

class LLM:
    def __init__(self, model, **kwargs):
        self.model = model
        with open(os.environ["FAKE_VLLM_LOG"], "a") as fh:
            fh.write(json.dumps({"model": model, "pid": os.getpid()}) + "\n")

    def get_tokenizer(self):
        return SimpleNamespace(chat_template=None)

    def generate(self, prompts, params, use_tqdm=True):
        return [SimpleNamespace(outputs=[SimpleNamespace(text="\\boxed{1}", token_ids=[1], logprobs=None,
                                                         finish_reason="stop")]) for _ in prompts]
"""


def test_each_model_evaluated_on_vllm_gets_its_own_process(tmp_path, monkeypatch):
    """vLLM does not reliably free a model's GPU memory, so `distill eval` runs each model on it
    in a fresh process."""
    import json
    import os

    from distill.evaluation import EvalSettings, run_eval

    (tmp_path / "pkg" / "vllm").mkdir(parents=True)
    (tmp_path / "pkg" / "vllm" / "__init__.py").write_text(FAKE_VLLM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))  # spawned processes start with this sys.path
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FAKE_VLLM_LOG", str(tmp_path / "llm.jsonl"))
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"id": f"p{i}", "question": f"q{i}", "answer": "1"}) + "\n" for i in range(4)))
    settings = EvalSettings(source=str(problems), backend="vllm", max_new_tokens=4)
    summaries = run_eval(settings, {"a": "model-a", "b": "model-b"}, tmp_path / "out", engine=Engine(backend="vllm"),
                         workers=1, progress=False)
    built = [json.loads(line) for line in (tmp_path / "llm.jsonl").read_text().splitlines()]
    assert [b["model"] for b in built] == ["model-a", "model-b"]
    assert len({b["pid"] for b in built} | {os.getpid()}) == 3
    assert summaries["a"]["accuracy"] == summaries["b"]["accuracy"] == 1.0
