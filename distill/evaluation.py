"""Evaluation: greedy answers of models on a problem set, graded, in resumable shards.

One core serves three callers: the pipeline's `evaluate` and `baseline_evaluate` stages (a run's
held-out split), `python -m distill eval` (any models on a benchmark or file, no run config) and
`distill compare`. Each model's problems are cut into shards that `generate_shard` writes and
resumes; each shard is graded on its own (so shards run as separate jobs); once every shard is
graded they are merged:

    <root>/<label>/shard-00000-of-00002.jsonl      responses, resumable
    <root>/<label>/shard-00000-of-00002.graded.jsonl + .stats.json
    <root>/<label>/graded.jsonl, metrics.json      merged
    <root>/tokens.md, tokens.json, tokens.png      the comparison across models (distill eval)
    <root>/eval.json                               what a `distill eval` directory evaluates
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.config import DataConfig, PromptConfig, RunConfig
from distill.data import shard_slice
from distill.efficiency import summarize, write_token_report
from distill.errors import DistillError
from distill.generation import (
    Backend,
    Engine,
    LazyBackend,
    SamplingSpec,
    engine_for,
    generate_shard,
    merge_shards,
    record_id,
    task,
)
from distill.grading import default_workers, grade_records
from distill.integrity import artifact, bind, model_fingerprint
from distill.jsonl import iter_jsonl, read_jsonl, write_json, write_jsonl
from distill.layout import EvalPaths, RunPaths
from distill.problems import eval_problems, load_problems
from distill.prompts import build_prompt
from distill.stage import BASELINE, FIRST, UNDO, Result, Stage, Unit, merged
from distill.student import BASELINE_TRAIN, TRAIN

# -- the core --------------------------------------------------------------------------------------


def read_json_or_none(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _complete(path: Path, ids: list[str]) -> bool:
    if not path.exists():
        return False
    have = {r["id"] for r in iter_jsonl(path, allow_partial_tail=True)}
    return all(i in have for i in ids)


def evaluate_part(
    paths: EvalPaths, label: str, shard: int, problems: list[dict[str, Any]], backend: Callable[[], Backend], *,
    model_id: str, prompt: PromptConfig, max_new_tokens: int, batch_size: int, workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer (resuming) and grade one shard of one model; a shard already graded costs
    nothing, and the model (`backend()`) is loaded only when answers are missing. The shard is
    bound to `model_id` and the prompt settings: one written by another model is redone.
    Returns the generation statistics of this call (nothing generated: zero new records)."""
    part = shard_slice(problems, shard, paths.num_shards)
    ids = [record_id(p["id"], 0) for p in part]
    out, graded_out = paths.shard(label, shard), paths.graded_shard(label, shard)
    bind(out, {"model": model_id, "prompt": dataclasses.asdict(prompt), "max_new_tokens": max_new_tokens},
         graded_out, paths.stats(label, shard))
    gen_stats: dict[str, Any] = {"records": len(ids), "generated_records": 0, "new_tokens": 0, "seconds": 0.0,
                                 "tokens_per_s": 0.0}
    if _complete(graded_out, ids):
        return gen_stats
    if not ids:  # more shards than problems: an empty shard is complete as it is
        write_jsonl(out, [])
        write_jsonl(graded_out, [])
        write_json(paths.stats(label, shard), {"generation": gen_stats, "grading": {"answers": 0, "seconds": 0.0}})
        return gen_stats
    if not _complete(out, ids):
        model = backend()
        tasks = [task(p, build_prompt(model.tokenizer, prompt, p["question"]), model=label) for p in part]
        gen_stats = generate_shard(model, tasks, out, SamplingSpec(max_new_tokens=max_new_tokens), batch_size,
                                   desc=f"eval {label} {shard}/{paths.num_shards}", progress=progress)
    start = time.perf_counter()
    graded = grade_records(read_jsonl(out), workers=workers, progress=progress)
    seconds = time.perf_counter() - start
    write_jsonl(graded_out, graded)
    grade_stats = {"answers": len(graded), "seconds": round(seconds, 3), "workers": workers or default_workers(),
                   "answers_per_s": round(len(graded) / seconds, 1) if seconds > 0 else 0.0}
    write_json(paths.stats(label, shard), {"generation": gen_stats, "grading": grade_stats})
    return gen_stats


def expected_ids(problems: list[dict[str, Any]], num_shards: int) -> list[list[str]]:
    return [[p["id"] for p in shard_slice(problems, s, num_shards)] for s in range(num_shards)]


def merge_model(paths: EvalPaths, label: str, problems: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """One model's graded shards merged into `graded.jsonl` (problem order); `keys` name the
    units that wrote them, so a damaged shard is redone by its own unit."""
    outputs = {key: paths.graded_shard(label, s) for s, key in enumerate(keys)}
    merged(outputs, lambda files: merge_shards(files, expected_ids(problems, paths.num_shards), 1, paths.graded(label)))
    return read_jsonl(paths.graded(label))


def throughput(paths: EvalPaths, label: str) -> dict[str, Any]:
    """Generation tokens/s and grading answers/s over the shards (as last run)."""
    tokens = gen_s = answers = grade_s = 0.0
    for shard in range(paths.num_shards):
        stats = read_json_or_none(paths.stats(label, shard)) or {}
        g, r = stats.get("generation", {}), stats.get("grading", {})
        tokens, gen_s = tokens + g.get("new_tokens", 0), gen_s + g.get("seconds", 0)
        answers, grade_s = answers + r.get("answers", 0), grade_s + r.get("seconds", 0)
    return {"generation_tokens_per_s": round(tokens / gen_s, 1) if gen_s else None,
            "grading_answers_per_s": round(answers / grade_s, 1) if grade_s else None}


# -- the pipeline's stages ---------------------------------------------------------------------------


def eval_models(cfg: RunConfig, it: int, baseline: bool = False) -> dict[str, str]:
    """label -> model directory for this iteration's evaluation (or the baseline's)."""
    paths = RunPaths(cfg.run_dir)
    if baseline:
        return {"oneshot": str(paths.baseline(it).model)}
    models = {"student": str(paths.student(it))}
    if it == 0 and cfg.eval.baselines:
        models = {"teacher": cfg.models.teacher, "base": cfg.models.student, **models}
    return models


def _units(baseline: bool) -> Callable[[RunConfig, int], list[str]]:
    def units(cfg: RunConfig, it: int) -> list[str]:
        return [f"{label}:{s}" for label in eval_models(cfg, it, baseline) for s in range(cfg.eval.num_shards)]
    return units


def _evaluate(baseline: bool) -> Callable[[Unit], Result]:
    def evaluate(unit: Unit) -> Result:
        """One (model, shard) of the held-out split: the teacher with its own engine settings
        (no logprobs), the students with `eval`'s."""
        cfg, it = unit.cfg, unit.iteration
        label, shard = unit.key.rsplit(":", 1)
        role = "teacher" if label == "teacher" else "student"
        model = eval_models(cfg, it, baseline)[label]
        with LazyBackend(engine_for(cfg, role, logprobs=False), model) as backend:
            stats = evaluate_part(
                unit.paths.eval(it, cfg.eval.num_shards), label, int(shard), eval_problems(cfg), backend.get,
                model_id=unit.model_identity(model), prompt=cfg.prompt,
                max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, progress=unit.progress)
        return Result(stats)
    return evaluate


def recover_evaluation(unit: Unit) -> Result | None:
    """A graded shard holding every problem of its slice."""
    cfg, it = unit.cfg, unit.iteration
    label, shard = unit.key.rsplit(":", 1)
    ev = unit.paths.eval(it, cfg.eval.num_shards)
    ids = [record_id(p["id"], 0) for p in shard_slice(eval_problems(cfg), int(shard), ev.num_shards)]
    return Result({"records": len(ids)}) if _complete(ev.graded_shard(label, int(shard)), ids) else None


def _merge(baseline: bool) -> Callable[[RunConfig, int, RunPaths, dict[str, Any]], dict[str, Any]]:
    def merge(cfg: RunConfig, it: int, paths: RunPaths, entry: dict[str, Any]) -> dict[str, Any]:
        num = cfg.eval.num_shards
        ev, problems = paths.eval(it, num), eval_problems(cfg)
        results, artifacts = {}, {}
        for label in eval_models(cfg, it, baseline):
            results[label] = summarize(merge_model(ev, label, problems, [f"{label}:{s}" for s in range(num)]))
            write_json(ev.metrics(label), results[label])
            artifacts[label] = artifact(ev.graded(label), paths.root)
        return {"num_shards": num * len(results),
                "metrics": {f"{label}_acc": m["accuracy"] for label, m in results.items()},
                "results": results, "artifacts": artifacts}
    return merge


def _summary(entry: dict[str, Any]) -> str:
    return "; ".join(f"{label}: accuracy {m['accuracy']:.3f} on {m['n']} problems, {m['tokens_mean']:.1f} tokens/answer"
                     for label, m in entry.get("results", {}).items())


EVALUATE = Stage("evaluate", _evaluate(False), plans=(FIRST, UNDO), units=_units(False), sharded=True,
                 inputs=lambda cfg, it: [TRAIN.output("model", it)], merge=_merge(False), summary=_summary,
                 produces=("teacher", "base", "student"),
                 recover=recover_evaluation,
                 unit_name="evaluation task")
BASELINE_EVALUATE = Stage("baseline_evaluate", _evaluate(True), plans=(BASELINE,), units=_units(True), sharded=True,
                          inputs=lambda cfg, it: [BASELINE_TRAIN.output("model", it)], merge=_merge(True),
                          produces=("oneshot",),
                          recover=recover_evaluation,
                          resources=EVALUATE.resource_section, summary=_summary, unit_name="evaluation task")


# -- python -m distill eval ----------------------------------------------------------------------------


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


def settings_problems(settings: EvalSettings) -> list[dict[str, Any]]:
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


def claim(paths: EvalPaths, settings: EvalSettings, models: dict[str, str]) -> dict[str, str]:
    """Record settings and models on first use; refuse different settings or a label that now
    points at another model (its shards would mix two models' answers). Returns every model the
    directory has evaluated, so a model added later joins the same report."""
    meta = read_json_or_none(paths.meta)
    wanted = settings.to_dict()
    if meta is not None:
        if meta["settings"] != wanted:
            diff = sorted(k for k in wanted if meta["settings"].get(k) != wanted[k])
            raise DistillError(f"{paths.meta}: this directory was evaluated with other settings "
                               f"({', '.join(diff)} differ); use another --out")
        for label, path in models.items():
            old = meta["models"].get(label)
            if old is not None and old != path:
                raise DistillError(f"{paths.meta}: label {label!r} was {old}, not {path}; use another label or --out")
        models = {**meta["models"], **models}
    paths.root.mkdir(parents=True, exist_ok=True)
    write_json(paths.meta, {"settings": wanted, "models": models})
    return models


def run_model(paths: EvalPaths, settings: EvalSettings, label: str, model: str, problems: list[dict[str, Any]],
              shards: list[int], engine: Engine, batch_size: int, workers: int | None, progress: bool) -> None:
    """The given shards of one model, loading it at most once."""
    with LazyBackend(engine, model) as backend:
        for shard in shards:
            evaluate_part(paths, label, shard, problems, backend.get,
                          model_id=f"fingerprint:{model_fingerprint(model)}", prompt=settings.prompt,
                          max_new_tokens=settings.max_new_tokens, batch_size=batch_size, workers=workers,
                          progress=progress)


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
    paths = EvalPaths(Path(out), settings.num_shards)
    problems = settings_problems(settings)
    known = claim(paths, settings, models)
    engine = engine or Engine(backend=settings.backend)
    todo = list(range(settings.num_shards)) if shards is None else shards
    for shard in todo:
        if not 0 <= shard < settings.num_shards:
            raise DistillError(f"--shard {shard}: out of range for {settings.num_shards} shards")
    separate = engine.backend == "vllm" and len(models) > 1
    for label, model in models.items():
        args = (paths, settings, label, model, problems, todo, engine, batch_size, workers, progress)
        if separate:
            in_own_process(label, run_model, *args)
        else:
            run_model(*args)
    expected = expected_ids(problems, settings.num_shards)

    def done(label: str) -> bool:
        return all(_complete(paths.graded_shard(label, s), [record_id(i, 0) for i in expected[s]])
                   for s in range(settings.num_shards))

    if not all(done(label) for label in models):
        return None
    records_by_label = {}
    for label in [lb for lb in known if done(lb)]:
        records_by_label[label] = merge_model(paths, label, problems, [str(s) for s in range(settings.num_shards)])
        write_json(paths.metrics(label), {**summarize(records_by_label[label]), **throughput(paths, label),
                                          "model": known[label]})
    limit = f", first {settings.limit}" if settings.limit else ""
    write_token_report(records_by_label, paths.root, f"{settings.source}{limit}: {len(problems)} problems",
                       extra={"settings": settings.to_dict(), "paths": {lb: known[lb] for lb in records_by_label}})
    return {label: summarize(rs) for label, rs in records_by_label.items()}
