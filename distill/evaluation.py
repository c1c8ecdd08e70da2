"""Standalone evaluation of one or more models on a benchmark (or any problem file).

Laid out like a pipeline stage, without a run config: each model's problems are cut into
shards that `generate_shard` writes and resumes, each shard is graded on its own (so shards
can run as separate jobs), and once every shard is graded they are merged and reported:

    <out>/eval.json                               what this directory evaluates (checked on rerun)
    <out>/<label>/shard-00000-of-00002.jsonl      responses, resumable
    <out>/<label>/shard-00000-of-00002.graded.jsonl + .stats.json
    <out>/<label>/graded.jsonl, metrics.json      merged
    <out>/tokens.md, tokens.json, tokens.png      the comparison across models
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.config import DataConfig, PromptConfig
from distill.data import shard_slice
from distill.efficiency import summarize, write_token_report
from distill.errors import DistillError
from distill.generation import Engine, SamplingSpec, generate_shard, load_backend, merge_shards, record_id
from distill.grading import _default_workers, grade_records
from distill.jsonl import iter_jsonl, read_jsonl, write_json, write_jsonl
from distill.problems import load_problems
from distill.prompts import build_prompt


@dataclass
class EvalSettings:
    """Everything that decides the numbers; a directory is tied to one set of them."""

    source: str  # a benchmark (`gsm8k`, `math500:test`) or a problem file
    limit: int | None = None
    max_new_tokens: int = 256
    num_shards: int = 1
    backend: str = "transformers"
    prompt: PromptConfig = field(default_factory=PromptConfig)
    # Field mapping for files; ignored for named benchmarks, which bring their own.
    data: DataConfig = field(default_factory=lambda: DataConfig(test=None))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_json_or_none(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def eval_problems(settings: EvalSettings) -> list[dict[str, Any]]:
    data = dataclasses.replace(settings.data, test=settings.source)
    return load_problems(data, "test", settings.limit)


def parse_models(specs: list[str]) -> dict[str, str]:
    """`[label=]path` strings -> {label: path}; the label defaults to the directory's name."""
    models: dict[str, str] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).name, spec
        if not label or not path:
            raise DistillError(f"--model {spec}: expected [label=]path")
        if label in models:
            raise DistillError(f"--model {spec}: label {label!r} given twice (use label=path)")
        if not Path(path).exists():
            raise DistillError(f"--model {spec}: path not found: {path}")
        models[label] = path
    return models


class EvalDir:
    """Paths of an evaluation directory, and the guard that keeps one settings per directory."""

    def __init__(self, root: Path, settings: EvalSettings) -> None:
        self.root, self.settings = Path(root), settings

    @property
    def meta(self) -> Path:
        return self.root / "eval.json"

    def shard(self, label: str, shard: int) -> Path:
        return self.root / label / f"shard-{shard:05d}-of-{self.settings.num_shards:05d}.jsonl"

    def graded_shard(self, label: str, shard: int) -> Path:
        return self.shard(label, shard).with_suffix(".graded.jsonl")

    def stats(self, label: str, shard: int) -> Path:
        return self.shard(label, shard).with_suffix(".stats.json")

    def graded(self, label: str) -> Path:
        return self.root / label / "graded.jsonl"

    def claim(self, models: dict[str, str]) -> dict[str, str]:
        """Record settings and models on first use; refuse different settings or a label that
        now points at another model (its shards would mix two models' answers). Returns every
        model this directory has evaluated, so a model added later joins the same report."""
        meta = read_json_or_none(self.meta)
        settings = self.settings.to_dict()
        if meta is not None:
            if meta["settings"] != settings:
                diff = sorted(k for k in settings if meta["settings"].get(k) != settings[k])
                raise DistillError(f"{self.meta}: this directory was evaluated with other settings "
                                   f"({', '.join(diff)} differ); use another --out")
            for label, path in models.items():
                old = meta["models"].get(label)
                if old is not None and old != path:
                    raise DistillError(f"{self.meta}: label {label!r} was {old}, not {path}; use another label or --out")
            models = {**meta["models"], **models}
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.meta, {"settings": settings, "models": models})
        return models


def _complete(path: Path, ids: list[str]) -> bool:
    if not path.exists():
        return False
    have = {r["id"] for r in iter_jsonl(path, allow_partial_tail=True)}
    return all(i in have for i in ids)


def run_shard(
    d: EvalDir, label: str, model: str, problems: list[dict[str, Any]], shard: int, *,
    backend_cache: dict[str, Any], engine: Engine, batch_size: int, workers: int | None, progress: bool,
) -> None:
    """Generate (resuming) and grade one shard; a shard already graded costs nothing."""
    s = d.settings
    part = shard_slice(problems, shard, s.num_shards)
    ids = [record_id(p["id"], 0) for p in part]
    out, graded_out = d.shard(label, shard), d.graded_shard(label, shard)
    if _complete(graded_out, ids):
        return
    gen_stats: dict[str, Any] = {}
    if not _complete(out, ids):
        if label not in backend_cache:  # loaded only when something is left to generate
            backend_cache.clear()
            backend_cache[label] = load_backend(engine, model)
        backend = backend_cache[label]
        tasks = [{"id": p["id"], "prompt": build_prompt(backend.tokenizer, s.prompt, p["question"]),
                  "question": p["question"], "gold": p["gold"], "model": label,
                  **({"meta": p["meta"]} if p.get("meta") else {})} for p in part]
        gen_stats = generate_shard(backend, tasks, out, SamplingSpec(max_new_tokens=s.max_new_tokens), batch_size,
                                   desc=f"{label} shard {shard}/{s.num_shards}", progress=progress)
    records = read_jsonl(out)
    start = time.perf_counter()
    graded = grade_records(records, workers=workers, progress=progress)
    seconds = time.perf_counter() - start
    write_jsonl(graded_out, graded)
    grade_stats = {"answers": len(graded), "seconds": round(seconds, 3), "workers": workers or _default_workers(),
                   "answers_per_s": round(len(graded) / seconds, 1) if seconds > 0 else 0.0}
    write_json(d.stats(label, shard), {"generation": gen_stats, "grading": grade_stats})


def _throughput(d: EvalDir, label: str) -> dict[str, Any]:
    """Generation tokens/s and grading answers/s over the shards (as last run)."""
    tokens = gen_s = answers = grade_s = 0.0
    for shard in range(d.settings.num_shards):
        stats = read_json_or_none(d.stats(label, shard)) or {}
        g, r = stats.get("generation", {}), stats.get("grading", {})
        tokens, gen_s = tokens + g.get("new_tokens", 0), gen_s + g.get("seconds", 0)
        answers, grade_s = answers + r.get("answers", 0), grade_s + r.get("seconds", 0)
    return {"generation_tokens_per_s": round(tokens / gen_s, 1) if gen_s else None,
            "grading_answers_per_s": round(answers / grade_s, 1) if grade_s else None}


def run_model(d: EvalDir, label: str, model: str, problems: list[dict[str, Any]], shards: list[int], engine: Engine,
              batch_size: int, workers: int | None, progress: bool) -> None:
    """The given shards of one model, loading it at most once."""
    cache: dict[str, Any] = {}
    for shard in shards:
        run_shard(d, label, model, problems, shard, backend_cache=cache, engine=engine, batch_size=batch_size,
                  workers=workers, progress=progress)


def in_own_process(label: str, fn: Any, *args: Any) -> None:
    """Run `fn(*args)` in a fresh process: vLLM does not reliably give a model's GPU memory
    back when it is deleted, so each model gets a process of its own."""
    proc = multiprocessing.get_context("spawn").Process(target=fn, args=args, name=f"eval-{label}")
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise DistillError(f"eval: {label}: its process exited with status {proc.exitcode} (its error is above)")


def run_eval(
    settings: EvalSettings, models: dict[str, str], out: Path, *, shards: list[int] | None = None,
    batch_size: int = 16, engine: Engine | None = None, workers: int | None = None, progress: bool = True,
) -> dict[str, Any] | None:
    """Evaluate `models` (label -> path) into `out`; returns the per-model summaries, or None
    when `shards` ran only part of the work (a later call without `shards` merges)."""
    d = EvalDir(out, settings)
    problems = eval_problems(settings)
    known = d.claim(models)
    engine = engine or Engine(backend=settings.backend)
    todo = list(range(settings.num_shards)) if shards is None else shards
    for shard in todo:
        if not 0 <= shard < settings.num_shards:
            raise DistillError(f"--shard {shard}: out of range for {settings.num_shards} shards")
    separate = engine.backend == "vllm" and len(models) > 1
    for label, model in models.items():
        args = (d, label, model, problems, todo, engine, batch_size, workers, progress)
        if separate:
            in_own_process(label, run_model, *args)
        else:
            run_model(*args)
    expected = [[p["id"] for p in shard_slice(problems, s, settings.num_shards)] for s in range(settings.num_shards)]

    def done(label: str) -> bool:
        return all(_complete(d.graded_shard(label, s), [record_id(i, 0) for i in expected[s]])
                   for s in range(settings.num_shards))

    if not all(done(label) for label in models):
        return None
    records_by_label = {}
    for label in [lb for lb in known if done(lb)]:
        merge_shards([d.graded_shard(label, s) for s in range(settings.num_shards)], expected, 1, d.graded(label))
        records_by_label[label] = read_jsonl(d.graded(label))
        metrics = {**summarize(records_by_label[label]), **_throughput(d, label), "model": known[label]}
        write_json(d.root / label / "metrics.json", metrics)
    limit = f", first {settings.limit}" if settings.limit else ""
    write_token_report(records_by_label, d.root, f"{settings.source}{limit}: {len(problems)} problems",
                       extra={"settings": settings.to_dict(), "paths": {lb: known[lb] for lb in records_by_label}})
    return {label: summarize(rs) for label, rs in records_by_label.items()}
