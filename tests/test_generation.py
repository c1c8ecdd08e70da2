import signal
import time

from distill.config import load_config
from distill.generation import SamplingSpec, TransformersBackend, generate_shard, merge_shards
from distill.jsonl import read_jsonl
from distill.layout import RunPaths
from distill.problems import train_problems
from tests.conftest import merge_stage_units, run_python, spawn_python


class FakeBackend:
    """Counts calls; completions echo the prompt so records can be checked against tasks."""

    tokenizer = None

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, spec, seed):
        from distill.generation import Completion

        self.calls += 1
        return [[Completion(f"{p}|{k}", 3, True) for k in range(spec.n)] for p in prompts]


def test_shard_resume_skips_done_and_repairs_a_torn_line(tmp_path):
    out = tmp_path / "shard.jsonl"
    tasks = [{"id": f"p{i}", "prompt": f"q{i}", "gold": str(i)} for i in range(10)]
    spec = SamplingSpec(n=2)
    generate_shard(FakeBackend(), tasks[:4], out, spec, batch_size=2, progress=False)
    with out.open("a") as fh:  # what a kill in the middle of a write leaves behind
        fh.write('{"id": "p4#0", "problem_id": "p4", "resp')
    backend = FakeBackend()
    stats = generate_shard(backend, tasks, out, spec, batch_size=2, progress=False)
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [f"p{i}#{k}" for i in range(10) for k in range(2)]
    assert backend.calls == 3 and stats["generated_records"] == 12
    assert records[9]["response"] == "q4|1" and records[0]["gold"] == "0"


def test_merge_refuses_incomplete_shards(tmp_path):
    out = tmp_path / "s0.jsonl"
    generate_shard(FakeBackend(), [{"id": "a", "prompt": "x"}], out, SamplingSpec(), 4, progress=False)
    try:
        merge_shards([out], [["a", "b"]], 1, tmp_path / "merged.jsonl")
    except Exception as exc:
        assert "s0.jsonl: 1 of 2 records missing" in str(exc)
    else:
        raise AssertionError("merge accepted a shard with a missing record")
    assert not (tmp_path / "merged.jsonl").exists()


def test_transformers_backend_batches_match_single_prompts(tiny_world):
    backend = TransformersBackend(tiny_world.teacher)
    prompts = ["Question: Tom has 3 pens.\nAnswer: ", "Question: 5\nAnswer: ", "Q"]
    spec = SamplingSpec(max_new_tokens=6)
    batched = backend.generate(prompts, spec, seed=0)
    single = [backend.generate([p], spec, seed=0)[0] for p in prompts]
    assert [c[0].text for c in batched] == [c[0].text for c in single]
    assert all(c[0].n_tokens <= 6 for c in batched)
    sampled = backend.generate(prompts[:1], SamplingSpec(n=3, temperature=1.0, max_new_tokens=6), seed=1)
    assert len(sampled) == 1 and len(sampled[0]) == 3


def test_sigkilled_shard_resumes_with_every_record_exactly_once(tiny_world, tmp_path):
    cfg_path = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    overrides = ["generation.batch_size=1", "generation.max_new_tokens=24", "generation.num_shards=1", "generation.n=2",
                 "generation.temperature=1.0"]
    cfg = load_config(cfg_path, overrides)
    shard = RunPaths(cfg.run_dir).gen_shard(0, 0, 1)
    code = (f"from distill.config import load_config; from tests.conftest import run_stage_unit; "
            f"run_stage_unit(load_config({str(cfg_path)!r}, {overrides!r}), 0, 'generate', '0')")
    proc = spawn_python(code)
    deadline = time.time() + 60
    while time.time() < deadline and (not shard.exists() or shard.read_text().count("\n") < 6):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(read_jsonl(shard, allow_partial_tail=True))
    assert 6 <= before < 48, f"kill did not land mid-run ({before} records)"
    done = run_python(code, timeout=300)
    assert done.returncode == 0, done.stderr
    ids = [r["id"] for r in read_jsonl(shard)]
    problems = [p["id"] for p in train_problems(cfg)]
    assert sorted(ids) == sorted(f"{p}#{k}" for p in problems for k in range(2))
    assert len(ids) == len(set(ids))
    assert merge_stage_units(cfg, 0, "generate")["records"] == 48


def test_greedy_decoding_ignores_the_models_own_sampling_defaults(tiny_world, tmp_path):
    """Qwen Instruct checkpoints ship top_k and repetition_penalty in generation_config.json;
    greedy answers must still be the plain argmax continuation, as vLLM's are."""
    import json
    import shutil

    import torch

    model_dir = tmp_path / "teacher"
    shutil.copytree(tiny_world.teacher, model_dir)
    gen_cfg = json.loads((model_dir / "generation_config.json").read_text())
    gen_cfg |= {"repetition_penalty": 3.0, "top_k": 2, "do_sample": True, "temperature": 0.6}
    (model_dir / "generation_config.json").write_text(json.dumps(gen_cfg))
    backend = TransformersBackend(model_dir)
    prompt = "Question: Tom has 3 pens. He buys 2 bags with 4 pens each. How many pens does he have now?\nAnswer: "
    (completion,), = backend.generate([prompt], SamplingSpec(max_new_tokens=12), seed=0)
    ids = backend.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(completion.n_tokens):
            ids = torch.cat([ids, backend.model(ids).logits[:, -1:].argmax(-1)], dim=1)
    plain = backend.tokenizer.decode(ids[0, -completion.n_tokens :], skip_special_tokens=True)
    assert completion.text == plain


def test_chat_template_arguments_reach_the_template(tiny_world):
    from transformers import AutoTokenizer

    from distill.config import PromptConfig
    from distill.prompts import build_prompt

    tok = AutoTokenizer.from_pretrained(tiny_world.student)
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}")
    plain = build_prompt(tok, PromptConfig(), "1+1?")
    off = build_prompt(tok, PromptConfig(chat_template_kwargs={"enable_thinking": False}), "1+1?")
    assert off == plain + "<no-think>"


def test_several_greedy_samples_are_refused(tiny_world, tmp_path):
    import pytest

    from distill.errors import ConfigError

    cfg = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"generation.n: 4 samples at temperature 0 would be 4 copies"):
        load_config(cfg, ["generation.n=4"])
    with pytest.raises(ConfigError, match=r"undo.n: 4 samples at temperature 0"):
        load_config(cfg, ["undo.temperature=0"])
    assert load_config(cfg, ["generation.n=4", "generation.temperature=0.7"]).generation.n == 4


def test_slot_text_inside_a_value_stays_literal():
    from distill.prompts import fill

    template = "Question: {question}\nPrevious answer: {previous}\nStudent answer: {student_answer}\nVerdict: {verdict}"
    out = fill(template, question="What is {verdict}?", previous="use {question} here", student_answer="\\boxed{5}",
               verdict="wrong")
    assert out == ("Question: What is {verdict}?\nPrevious answer: use {question} here\nStudent answer: \\boxed{5}\n"
                   "Verdict: wrong")
    assert fill("\\boxed{} {question}", question="1+1") == "\\boxed{} 1+1"
