"""The stages of one iteration as plain functions: inputs from the run directory, outputs back
into it, progress into the manifest. Whoever calls them (a SLURM array task, a local
subprocess, a test) only decides *where* they run.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from distill.config import RunConfig
from distill.data import load_problems, shard_slice
from distill.errors import DistillError
from distill.generation import SamplingSpec, generate_shard, load_backend, merge_shards
from distill.jsonl import atomic_write_text, iter_jsonl, read_jsonl, write_json, write_jsonl
from distill.layout import RunPaths
from distill.manifest import Manifest, artifact
from distill.prompts import build_prompt

ITER0_STAGES = ("generate", "verify", "train", "evaluate")


def open_run(cfg: RunConfig) -> tuple[RunPaths, Manifest]:
    """Create the run directory on first use; refuse a config that differs from the run's."""
    paths = RunPaths(cfg.run_dir)
    manifest = Manifest(paths.root, soft_lock=cfg.lock == "soft")
    current = manifest.read().get("config_hash")
    if current is not None and current != cfg.hash():
        raise DistillError(
            f"{cfg.source}: config differs from the one {paths.root} was started with "
            f"({cfg.hash()} vs {current}, see {paths.config}); use another run name (RUN=...)"
        )
    if current is None:
        paths.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(paths.config, cfg.to_yaml())
        manifest.set_meta(run=cfg.name, config_hash=cfg.hash(), config=str(paths.config))
    return paths, manifest


# -- generation --------------------------------------------------------------------------------


def _train_problems(cfg: RunConfig) -> list[dict[str, Any]]:
    return load_problems(cfg.data, "train", cfg.data.train_limit)


def _spec(cfg: RunConfig, greedy: bool = False, max_new_tokens: int | None = None) -> SamplingSpec:
    g = cfg.generation
    return SamplingSpec(
        n=1 if greedy else g.n,
        temperature=0.0 if greedy else g.temperature,
        top_p=g.top_p,
        max_new_tokens=max_new_tokens or g.max_new_tokens,
        seed=g.seed,
    )


def generate_teacher_shard(cfg: RunConfig, it: int, shard: int, *, job_id: str | None = None, progress: bool = True) -> dict:
    paths, manifest = open_run(cfg)
    num = cfg.generation.num_shards
    manifest.mark_shard(it, "generate", str(shard), "running", job_id=job_id)
    try:
        problems = shard_slice(_train_problems(cfg), shard, num)
        backend = load_backend(cfg.generation.backend, cfg.models.teacher)
        tasks = [
            {"id": p["id"], "prompt": build_prompt(backend.tokenizer, cfg.prompt, p["question"]),
             "question": p["question"], "gold": p["gold"]}
            for p in problems
        ]
        stats = generate_shard(
            backend, tasks, paths.gen_shard(it, shard, num), _spec(cfg), cfg.generation.batch_size,
            desc=f"generate shard {shard}/{num}", progress=progress,
        )
    except BaseException as exc:
        manifest.mark_shard(it, "generate", str(shard), "failed", error=_one_line(exc))
        raise
    manifest.mark_shard(it, "generate", str(shard), "done", **stats)
    return stats


def merge_generation(cfg: RunConfig, it: int) -> int:
    paths, manifest = open_run(cfg)
    num = cfg.generation.num_shards
    problems = _train_problems(cfg)
    expected = [[p["id"] for p in shard_slice(problems, s, num)] for s in range(num)]
    shard_paths = [paths.gen_shard(it, s, num) for s in range(num)]
    n = merge_shards(shard_paths, expected, cfg.generation.n, paths.generations(it))
    shards = manifest.stage(it, "generate").get("shards", {})
    tokens = sum(s.get("new_tokens", 0) for s in shards.values())
    seconds = sum(s.get("seconds", 0) for s in shards.values())
    manifest.mark(
        it, "generate", "done", num_shards=num,
        artifacts={"generations": artifact(paths.generations(it), paths.root)},
        metrics={"records": n, "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0},
    )
    return n


# -- verification ------------------------------------------------------------------------------


def grade_in_place(records: list[dict[str, Any]], progress: bool = True) -> list[dict[str, Any]]:
    from distill.grading import gold_answer, grade

    results = grade([(gold_answer(r["gold"]), r["response"]) for r in records], progress=progress)
    return [{**r, "pred_answer": pred, "correct": ok} for r, (pred, ok) in zip(records, results, strict=True)]


def verify(cfg: RunConfig, it: int, *, job_id: str | None = None, progress: bool = True) -> dict:
    """Keep the teacher rationales whose final answer matches the gold answer."""
    paths, manifest = open_run(cfg)
    manifest.mark(it, "verify", "running", job_id=job_id)
    graded = grade_in_place(read_jsonl(paths.generations(it)), progress=progress)
    kept = [r for r in graded if r["correct"]]
    write_jsonl(paths.graded(it), graded)
    write_jsonl(paths.verified(it), kept)
    metrics = {
        "records": len(graded),
        "kept": len(kept),
        "teacher_accuracy": round(len(kept) / len(graded), 4) if graded else 0.0,
        "problems_with_rationale": len({r["problem_id"] for r in kept}),
        **{f"kept_{k}": v for k, v in token_stats([r["n_tokens"] for r in kept]).items()},
    }
    manifest.mark(
        it, "verify", "done", metrics=metrics,
        artifacts={"graded": artifact(paths.graded(it), paths.root), "verified": artifact(paths.verified(it), paths.root)},
    )
    return metrics


def token_stats(counts: list[int]) -> dict[str, float]:
    if not counts:
        return {"tokens_mean": 0.0, "tokens_median": 0.0, "tokens_max": 0}
    return {
        "tokens_mean": round(statistics.fmean(counts), 2),
        "tokens_median": float(statistics.median(counts)),
        "tokens_max": max(counts),
    }


# -- training ----------------------------------------------------------------------------------


def training_pairs(cfg: RunConfig, it: int, tokenizer: Any) -> list[tuple[str, str]]:
    """(student prompt, teacher rationale): the student sees its own prompt format."""
    paths = RunPaths(cfg.run_dir)
    return [(build_prompt(tokenizer, cfg.prompt, r["question"]), r["response"]) for r in iter_jsonl(paths.verified(it))]


def train_student(
    cfg: RunConfig, it: int, *, job_id: str | None = None,
    should_stop: Callable[[], bool] | None = None, progress: bool = True,
):
    from transformers import AutoTokenizer

    from distill.training import train

    paths, manifest = open_run(cfg)
    manifest.mark(it, "train", "running", job_id=job_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.models.student)
        pairs = training_pairs(cfg, it, tokenizer)
        if not pairs:
            raise DistillError(f"{paths.verified(it)}: no verified rationales to train on")
        result = train(cfg.models.student, pairs, cfg.train, paths.train_dir(it), should_stop=should_stop, progress=progress)
    except BaseException as exc:
        manifest.mark(it, "train", "failed", error=_one_line(exc))
        raise
    metrics = {"step": result.step, "total_steps": result.total_steps, "loss": result.loss,
               "tokens_per_s": result.tokens_per_s, "examples": len(pairs)}
    if result.resumed_from is not None:
        manifest.mark(it, "train", "running", resumed_from=result.resumed_from)
    if not result.finished:
        manifest.mark(it, "train", "pending", metrics=metrics)
        return result
    manifest.mark(it, "train", "done", metrics=metrics, artifacts={"model": artifact(result.model_dir, paths.root)})
    return result


# -- evaluation --------------------------------------------------------------------------------


def eval_models(cfg: RunConfig, it: int) -> dict[str, str]:
    """label -> model directory for this iteration's evaluation."""
    models = {"student": str(RunPaths(cfg.run_dir).student(it))}
    if it == 0 and cfg.eval.baselines:
        models = {"teacher": cfg.models.teacher, "base": cfg.models.student, **models}
    return models


def eval_units(cfg: RunConfig, it: int) -> list[tuple[str, int]]:
    return [(label, s) for label in eval_models(cfg, it) for s in range(cfg.eval.num_shards)]


def _eval_problems(cfg: RunConfig) -> list[dict[str, Any]]:
    return load_problems(cfg.data, cfg.eval.split, cfg.eval.limit)


def evaluate_shard(
    cfg: RunConfig, it: int, label: str, shard: int, *, job_id: str | None = None, progress: bool = True
) -> dict:
    """Generate greedily with one model on a slice of the eval split, then grade the slice."""
    paths, manifest = open_run(cfg)
    num = cfg.eval.num_shards
    key = f"{label}:{shard}"
    manifest.mark_shard(it, "evaluate", key, "running", job_id=job_id)
    try:
        problems = shard_slice(_eval_problems(cfg), shard, num)
        backend = load_backend(cfg.generation.backend, eval_models(cfg, it)[label])
        tasks = [
            {"id": p["id"], "prompt": build_prompt(backend.tokenizer, cfg.prompt, p["question"]),
             "question": p["question"], "gold": p["gold"], "model": label}
            for p in problems
        ]
        out = paths.eval_shard(it, label, shard, num)
        stats = generate_shard(
            backend, tasks, out, _spec(cfg, greedy=True, max_new_tokens=cfg.eval.max_new_tokens),
            cfg.eval.batch_size, desc=f"eval {label} {shard}/{num}", progress=progress,
        )
        write_jsonl(out.with_suffix(".graded.jsonl"), grade_in_place(read_jsonl(out), progress=progress))
    except BaseException as exc:
        manifest.mark_shard(it, "evaluate", key, "failed", error=_one_line(exc))
        raise
    manifest.mark_shard(it, "evaluate", key, "done", **stats)
    return stats


def merge_evaluation(cfg: RunConfig, it: int) -> dict[str, dict]:
    paths, manifest = open_run(cfg)
    num = cfg.eval.num_shards
    problems = _eval_problems(cfg)
    all_metrics, artifacts = {}, {}
    for label in eval_models(cfg, it):
        expected = [[p["id"] for p in shard_slice(problems, s, num)] for s in range(num)]
        graded_paths = [paths.eval_shard(it, label, s, num).with_suffix(".graded.jsonl") for s in range(num)]
        out = paths.eval_dir(it, label) / "graded.jsonl"
        merge_shards(graded_paths, expected, 1, out)
        records = read_jsonl(out)
        metrics = eval_metrics(records)
        write_json(paths.eval_dir(it, label) / "metrics.json", metrics)
        all_metrics[label] = metrics
        artifacts[label] = artifact(out, paths.root)
    summary = {f"{label}_acc": m["accuracy"] for label, m in all_metrics.items()}
    manifest.mark(it, "evaluate", "done", num_shards=num * len(all_metrics), metrics=summary,
                  results=all_metrics, artifacts=artifacts)
    return all_metrics


def eval_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    correct = [r for r in records if r["correct"]]
    wrong = [r for r in records if not r["correct"]]
    return {
        "n": len(records),
        "correct": len(correct),
        "accuracy": round(len(correct) / len(records), 4) if records else 0.0,
        **token_stats([r["n_tokens"] for r in records]),
        "correct_tokens_mean": token_stats([r["n_tokens"] for r in correct])["tokens_mean"],
        "incorrect_tokens_mean": token_stats([r["n_tokens"] for r in wrong])["tokens_mean"],
        "unfinished": sum(1 for r in records if not r["finished"]),
    }


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]

