"""`python -m distill gpu-check`: the first thing to run on a GPU allocation.

In a few minutes, on tiny models built here from the demo data (nothing is downloaded), it runs
every path of distill that touches a model on the job's device: training in the job's precision
with a kill and a resume, every distillation objective, LoRA and QLoRA (train, merge, reload),
the chunked loss at a real 151,936-token vocabulary, generation with transformers and with vLLM
(with logprobs, and tensor-parallel when more than one GPU is visible). It prints one row per
check with its peak GPU memory and speed, and exits with status 1 if any check failed. Without
CUDA the GPU-only rows are skipped, saying so, and the rest runs on the CPU.

    python -m distill gpu-check [--out runs/gpu-check]
    sbatch slurm/gpu-check.sbatch
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "tiny"
# head_dim 64: what vLLM's attention kernels support at the smallest
TEACHER = {"hidden_size": 256, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 512}
STUDENT = {"hidden_size": 128, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 256}


@dataclass
class Row:
    check: str
    status: str  # pass | FAIL | skip
    seconds: float = 0.0
    peak_mb: float | None = None
    tokens_per_s: float | None = None
    detail: str = ""


class GpuCheck:
    def __init__(self, out: Path, objective_names: list[str] | None = None) -> None:
        from distill import objectives

        self.out = out
        self.objectives = [objectives.get(n) for n in objective_names or objectives.names()]
        self.cuda = torch.cuda.is_available()
        self.gpus = torch.cuda.device_count() if self.cuda else 0
        self.rows: list[Row] = []

    # -- running one check ---------------------------------------------------------------------

    def run(self, name: str, fn: Callable[[], tuple[str, float | None]], *, needs_cuda: bool = False,
            needs_module: str | None = None, needs_gpus: int = 0) -> Row:
        import importlib.util

        why = ("no CUDA device" if needs_cuda and not self.cuda
               else f"{needs_module} is not installed"
               if needs_module and importlib.util.find_spec(needs_module) is None
               else f"{self.gpus} GPU(s) visible, needs {needs_gpus}" if self.gpus < needs_gpus else "")
        if why:
            row = Row(name, "skip", detail=why)
        else:
            if self.cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            try:
                detail, speed = fn()
                status = "pass"
            except Exception as exc:  # every failure becomes one row, the others still run
                lines = str(exc).strip().splitlines()
                detail, speed, status = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200], None, "FAIL"
            peak = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None
            row = Row(name, status, round(time.perf_counter() - start, 1), peak and round(peak, 1), speed, detail)
        self.rows.append(row)
        print(f"gpu-check: {row.check}: {row.status} {row.detail}", file=sys.stderr, flush=True)
        return row

    # -- the world -----------------------------------------------------------------------------

    def build(self) -> None:
        """Tokenizer and random teacher and student under `out/models` (kept if already there)."""
        from distill.jsonl import read_jsonl
        from distill.tiny import build_model, build_tokenizer, corpus_texts

        models = self.out / "models"
        self.teacher, self.student = models / "teacher", models / "student"
        if not (self.student / "config.json").exists():
            build_tokenizer(corpus_texts(DATA), models / "tokenizer", vocab_size=512)
            build_model(models / "tokenizer", self.teacher, seed=1, max_position_embeddings=256, **TEACHER)
            build_model(models / "tokenizer", self.student, seed=2, max_position_embeddings=256, **STUDENT)

        records = read_jsonl(DATA / "train.jsonl")[:256]
        self.pairs = [(f"Question: {r['question']}\nAnswer: ", r["solution"]) for r in records]
        self.prompts = [p for p, _ in self.pairs[:64]]

    def train_cfg(self, steps: int, **kw: Any) -> Any:
        """A `train` config from settings as a config file writes them (sections as mappings)."""
        from distill.train_config import TrainConfig
        from distill.typed_yaml import from_mapping

        return from_mapping(TrainConfig, {"lr": 1e-3, "max_steps": steps, "batch_size": 16, "max_length": 128,
                                          "save_steps": steps, "log_steps": 1, **kw}, "gpu-check: train")

    def train(self, name: str, cfg: Any, **kw: Any) -> Any:
        from distill.training import train

        result = train(self.student, self.pairs, cfg, self.out / "train" / name, progress=False,
                       teacher_path=self.teacher, **kw)
        if not result.finished or result.loss is None or result.loss != result.loss:
            raise RuntimeError(f"did not finish with a finite loss ({result})")
        return result

    # -- checks --------------------------------------------------------------------------------

    def environment(self) -> tuple[str, None]:
        from distill.device import placement

        place = placement("auto")
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(self.gpus)) or "no GPU"
        return (f"torch {torch.__version__}, CUDA {torch.version.cuda}, {names}; "
                f"precision auto -> {place.precision}"), None

    def objective(self, label: str, **kw: Any) -> Callable[[], tuple[str, float]]:
        name = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")

        def fn() -> tuple[str, float]:
            result = self.train(name, self.train_cfg(12, **kw))
            return f"loss {result.loss:.3f} after {result.step} steps", result.tokens_per_s
        return fn

    def kill_and_resume(self) -> tuple[str, float]:
        """Train in a child process, SIGKILL it after its second checkpoint, resume here; the
        end must match an uninterrupted run's step and loss."""
        cfg = self.train_cfg(60, save_steps=10, gradient_checkpointing=True)
        whole = self.train("sft-whole", cfg)
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
                f"from distill.gpucheck import GpuCheck; c = GpuCheck(Path({str(self.out)!r})); c.build(); "
                "c.train('sft-killed', c.train_cfg(60, save_steps=10, gradient_checkpointing=True))")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        ckpt = self.out / "train" / "sft-killed" / "checkpoints" / "step-00000020"
        deadline = time.monotonic() + 600
        while not ckpt.is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not ckpt.is_dir():
            raise RuntimeError(f"the child never wrote {ckpt.name}: {proc.stderr.read().decode()[-300:]}")
        resumed = self.train("sft-killed", cfg)
        diff = abs(resumed.loss - whole.loss)
        if resumed.step != whole.step or resumed.resumed_from is None or diff > 1e-2 * abs(whole.loss):
            raise RuntimeError(f"resumed run ended at step {resumed.step}, loss {resumed.loss}; "
                               f"uninterrupted: step {whole.step}, loss {whole.loss}")
        return (f"killed after step {resumed.resumed_from}, resumed to step {resumed.step}; loss {resumed.loss:.5f} "
                f"vs {whole.loss:.5f} uninterrupted (diff {diff:.1e})"), whole.tokens_per_s

    def qlora(self) -> tuple[str, float]:
        from transformers import AutoModelForCausalLM

        from distill.modeling import saved_dtype

        result = self.train("qlora", self.train_cfg(12, quantize="4bit", lora={"enabled": True}))
        merged = AutoModelForCausalLM.from_pretrained(result.model_dir, dtype=torch.bfloat16)
        if any("lora" in n for n, _ in merged.named_parameters()):
            raise RuntimeError("the saved model still has LoRA weights")
        return (f"4-bit NF4 + LoRA, merged into the base reloaded in the compute dtype "
                f"({saved_dtype(result.model_dir)}), reloaded"), result.tokens_per_s

    def chunked_loss(self) -> tuple[str, None]:
        """Peak GPU memory of forward + backward of SFT cross-entropy at V 151,936, L 4096,
        hidden 1536: chunked head + loss against the whole logits tensor."""
        import torch.nn.functional as F

        from distill.chunked import full_head_loss, head_loss

        n, h, v = 4096, 1536, 151_936
        dev = torch.device("cuda")
        peaks = {}
        for path in ("materialised", "chunked"):
            hidden = torch.randn(n, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
            weight = torch.randn(v, h, device=dev, dtype=torch.bfloat16) * 0.02
            rows = {"target": torch.randint(0, v, (n,), device=dev)}

            def loss(logits: torch.Tensor, r: dict) -> torch.Tensor:
                return F.cross_entropy(logits, r["target"], reduction="sum") / n

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            value = (full_head_loss(hidden, weight, loss, rows) if path == "materialised"
                     else head_loss(hidden, weight, loss, rows, chunk=256))
            value.backward()
            torch.cuda.synchronize()
            peaks[path] = (torch.cuda.max_memory_allocated() - base) / 2**20
            del hidden, weight, value
        ratio = peaks["chunked"] / peaks["materialised"]
        return (f"frozen bf16 head: {peaks['chunked']:.0f} MB chunked vs {peaks['materialised']:.0f} MB materialised "
                f"({ratio:.2f}x)"), None

    def hf_generation(self) -> tuple[str, float]:
        from distill.generation import SamplingSpec, TransformersBackend

        backend = TransformersBackend(self.teacher)
        start = time.perf_counter()
        out = backend.generate(self.prompts, SamplingSpec(max_new_tokens=32), seed=0)
        tokens = sum(c[0].n_tokens for c in out)
        rate = tokens / (time.perf_counter() - start)
        sampled = backend.generate(self.prompts[:4], SamplingSpec(n=2, temperature=0.8, max_new_tokens=16), seed=1)
        if [len(s) for s in sampled] != [2] * 4:
            raise RuntimeError("n=2 sampling returned the wrong number of samples")
        (self.out / "hf_greedy.json").write_text(json.dumps([c[0].text for c in out]))
        return f"{len(out)} prompts greedy on {backend.device}, {tokens} tokens; n=2 sampling", round(rate, 1)

    def vllm_generation(self, tensor_parallel_size: int) -> tuple[str, float]:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:  # one engine per process
            result = pool.submit(_vllm_child, str(self.teacher), self.prompts, tensor_parallel_size).result()
        hf = self.out / "hf_greedy.json"
        same = ""
        if hf.exists():
            texts = json.loads(hf.read_text())
            equal = sum(a == b for a, b in zip(texts, result["texts"], strict=False))
            same = f"; greedy text equal to transformers' for {equal}/{len(texts)} prompts"
        return (f"tp {tensor_parallel_size}: {len(result['texts'])} prompts, top-5 logprobs on every token{same}",
                result["tokens_per_s"])

    def objective_checks(self) -> list[Row]:
        """Each objective's own rows (`Objective.gpu_checks`): 12 steps of training with it."""
        return [self.run(label, self.objective(label, **settings))
                for objective in self.objectives for label, settings in objective.gpu_checks.items()]

    # -- all of them ---------------------------------------------------------------------------

    def run_all(self) -> list[Row]:
        self.run("environment", self.environment)
        self.build()
        self.run("sft, kill and resume (checkpointing on)", self.kill_and_resume)
        self.run("lora (base in the compute dtype)", self.objective("lora", lora={"enabled": True}))
        self.objective_checks()
        self.run("qlora: train, merge, reload", self.qlora, needs_module="bitsandbytes")
        self.run("chunked loss at V 151,936, L 4096", self.chunked_loss, needs_cuda=True)
        self.run("generation: transformers", self.hf_generation)
        self.run("generation: vLLM, logprobs", lambda: self.vllm_generation(1), needs_module="vllm")
        self.run("generation: vLLM, tensor parallel 2", lambda: self.vllm_generation(2), needs_cuda=True,
                 needs_module="vllm", needs_gpus=2)
        return self.rows


def _vllm_child(model: str, prompts: list[str], tensor_parallel_size: int) -> dict[str, Any]:
    from distill.generation import Engine, SamplingSpec, VLLMBackend

    backend = VLLMBackend(model, Engine("vllm", tensor_parallel_size, gpu_memory_utilization=0.5, logprobs=5))
    try:
        start = time.perf_counter()
        out = backend.generate(prompts, SamplingSpec(max_new_tokens=32), seed=0)
        seconds = time.perf_counter() - start
    finally:
        backend.close()
    if not all(c[0].top_logprobs and len(c[0].top_logprobs) == c[0].n_tokens for c in out):
        raise RuntimeError("a completion came back without its top-k logprobs")
    return {"texts": [c[0].text for c in out], "tokens_per_s": round(sum(c[0].n_tokens for c in out) / seconds, 1)}


def format_rows(rows: list[Row]) -> str:
    lines = ["| check | status | s | peak GPU MB | tokens/s | detail |", "|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r.peak_mb is None else f"{r.peak_mb:.0f}"
        speed = "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.0f}"
        lines.append(f"| {r.check} | {r.status} | {r.seconds} | {peak} | {speed} | {r.detail} |")
    return "\n".join(lines)


def main(out: Path, objective_names: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = GpuCheck(out, objective_names).run_all()
    table = format_rows(rows)
    print(table)
    (out / "gpu-check.md").write_text(table + "\n")
    (out / "gpu-check.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    failed = [r.check for r in rows if r.status == "FAIL"]
    skipped = [r.check for r in rows if r.status == "skip"]
    print(f"gpu-check: {len(rows) - len(failed) - len(skipped)} passed, {len(failed)} failed, {len(skipped)} skipped "
          f"-> {out / 'gpu-check.md'}")
    return 1 if failed else 0
