"""The stages of an iteration as plain functions: inputs from the run directory, outputs back
into it, progress into the manifest. Whoever calls them (a SLURM array task, a local
subprocess, a test) only decides *where* they run.

Iteration 0 distils from the training problems. Iteration N >= 1 is an UNDO step: the student
of N-1 is probed, its errors go back to the teacher with an error-conditioned prompt, the
verified new rationales join the training set and the student is retrained.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.config import RunConfig
from distill.data import shard_slice
from distill.efficiency import filter_rationales, length_stats, summarize
from distill.errors import DataError, DistillError
from distill.generation import Engine, SamplingSpec, generate_shard, load_backend, merge_shards
from distill.jsonl import atomic_write_text, iter_jsonl, read_jsonl, write_json, write_jsonl
from distill.layout import RunPaths
from distill.manifest import Manifest, artifact
from distill.problems import eval_problems, probe_problems, train_problems
from distill.prompts import build_prompt

BASELINE_STAGES = ("baseline_train", "baseline_evaluate")


def stages_for(it: int) -> tuple[str, ...]:
    return ("generate", "verify", "train", "evaluate") if it == 0 else ("mine", "generate", "verify", "train", "evaluate")


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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def engine_for(cfg: RunConfig, role: str, *, logprobs: bool = True) -> Engine:
    """How a role's model runs: the teacher with `generation`'s engine settings (top-k logprobs
    only when generating rationales), the student with `eval`'s."""
    attn = cfg.models.attn_implementation
    if role == "teacher":
        g = cfg.generation
        return Engine(g.backend, g.tensor_parallel_size, g.gpu_memory_utilization, g.logprobs if logprobs else 0, attn)
    e = cfg.eval
    return Engine(e.backend or cfg.generation.backend, e.tensor_parallel_size, e.gpu_memory_utilization, 0, attn)


def _meta(problem: dict[str, Any]) -> dict[str, Any]:
    """A problem's metadata (MATH subject and level, ...) for its generated records."""
    return {"meta": problem["meta"]} if problem.get("meta") else {}


def grade_in_place(records: list[dict[str, Any]], progress: bool = True) -> list[dict[str, Any]]:
    from distill.grading import grade_records

    return grade_records(records, progress=progress)


# -- error mining (iterations >= 1) ------------------------------------------------------------


def previous_rationales(cfg: RunConfig, it: int) -> dict[str, str]:
    """problem id -> the newest rationale the student was trained on before iteration `it`."""
    path = RunPaths(cfg.run_dir).train_data(it - 1)
    latest: dict[str, str] = {}
    for r in iter_jsonl(path):
        latest.setdefault(r["problem_id"], r["response"])  # records are newest first
    return latest


def mine(cfg: RunConfig, it: int, *, job_id: str | None = None, progress: bool = True) -> dict:
    """Probe the previous student greedily; its wrong answers become the teacher's next tasks."""
    paths, manifest = open_run(cfg)
    manifest.mark(it, "mine", "running", job_id=job_id)
    problems = probe_problems(cfg)
    backend = load_backend(engine_for(cfg, "student"), paths.student(it - 1))
    tasks = [{"id": p["id"], "prompt": build_prompt(backend.tokenizer, cfg.prompt, p["question"]),
              "question": p["question"], "gold": p["gold"]} for p in problems]
    out = paths.mine_dir(it) / "responses.jsonl"
    generate_shard(backend, tasks, out, SamplingSpec(max_new_tokens=cfg.eval.max_new_tokens),
                   cfg.eval.batch_size, desc="mine", progress=progress)
    graded = grade_in_place(read_jsonl(out), progress=progress)
    write_jsonl(paths.mine_dir(it) / "graded.jsonl", graded)
    previous = previous_rationales(cfg, it)
    errors = [
        {"id": r["problem_id"], "question": r["question"], "gold": r["gold"],
         "student_response": r["response"], "student_answer": r["pred_answer"] or "none",
         "verdict": "wrong", "previous": previous.get(r["problem_id"], "none")}
        for r in graded if not r["correct"]
    ]
    write_jsonl(paths.errors(it), errors)
    metrics = {"probed": len(graded), "errors": len(errors),
               "probe_accuracy": round(1 - len(errors) / len(graded), 4) if graded else 0.0}
    manifest.mark(it, "mine", "done", metrics=metrics, artifacts={"errors": artifact(paths.errors(it), paths.root)})
    return metrics


# -- generation --------------------------------------------------------------------------------


def generation_problems(cfg: RunConfig, it: int) -> list[dict[str, Any]]:
    """Iteration 0: the training problems. Later: the problems the student got wrong."""
    return train_problems(cfg) if it == 0 else read_jsonl(RunPaths(cfg.run_dir).errors(it))


def teacher_spec(cfg: RunConfig, it: int) -> SamplingSpec:
    g = cfg.generation
    n, temperature = (g.n, g.temperature) if it == 0 else (cfg.undo.n, cfg.undo.temperature)
    return SamplingSpec(n=n, temperature=temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens, seed=g.seed + it)


def teacher_prompt(cfg: RunConfig, tokenizer: Any, problem: dict[str, Any], it: int) -> str:
    if it == 0:
        return build_prompt(tokenizer, cfg.prompt, problem["question"])
    return build_prompt(
        tokenizer, cfg.prompt, problem["question"], template=cfg.undo.template, previous=problem["previous"],
        student_answer=problem["student_answer"], verdict=problem["verdict"],
    )


def generate_teacher_shard(cfg: RunConfig, it: int, shard: int, *, job_id: str | None = None, progress: bool = True) -> dict:
    paths, manifest = open_run(cfg)
    num = cfg.generation.num_shards
    manifest.mark_shard(it, "generate", str(shard), "running", job_id=job_id)
    try:
        problems = shard_slice(generation_problems(cfg, it), shard, num)
        backend = load_backend(engine_for(cfg, "teacher"), cfg.models.teacher)
        tasks = [{"id": p["id"], "prompt": teacher_prompt(cfg, backend.tokenizer, p, it),
                  "question": p["question"], "gold": p["gold"], **_meta(p)} for p in problems]
        stats = generate_shard(
            backend, tasks, paths.gen_shard(it, shard, num), teacher_spec(cfg, it), cfg.generation.batch_size,
            desc=f"generate shard {shard}/{num}", progress=progress,
        )
    except BaseException as exc:
        manifest.mark_shard(it, "generate", str(shard), "failed", error=_one_line(exc))
        raise
    manifest.mark_shard(it, "generate", str(shard), "done", **stats)
    return stats


def merge_or_reopen(manifest: Manifest, it: int, stage: str, keys: list[str], shard_paths: list[Path],
                    expected: list[list[str]], n: int, out_path: Path) -> int:
    """`merge_shards`, but a shard file that does not parse (cut short mid-line or damaged after
    its job ended) is marked failed under its manifest key, so the next run redoes it:
    generation resumes from its complete lines."""
    try:
        return merge_shards(shard_paths, expected, n, out_path)
    except DataError as exc:
        key = next((k for k, p in zip(keys, shard_paths, strict=True) if exc.path == p), None)
        if key is None:
            raise
        manifest.mark_shard(it, stage, key, "failed", error=str(exc))
        raise DataError(f"{exc}; {stage} shard {key} is marked failed: run again to redo it", exc.path) from None


def merge_generation(cfg: RunConfig, it: int) -> int:
    paths, manifest = open_run(cfg)
    num = cfg.generation.num_shards
    problems = generation_problems(cfg, it)
    expected = [[p["id"] for p in shard_slice(problems, s, num)] for s in range(num)]
    shard_paths = [paths.gen_shard(it, s, num) for s in range(num)]
    n = merge_or_reopen(manifest, it, "generate", [str(s) for s in range(num)], shard_paths, expected,
                        teacher_spec(cfg, it).n, paths.generations(it))
    shards = manifest.stage(it, "generate").get("shards", {})
    tokens = sum(s.get("new_tokens", 0) for s in shards.values())
    seconds = sum(s.get("seconds", 0) for s in shards.values())
    manifest.mark(
        it, "generate", "done", num_shards=num,
        artifacts={"generations": artifact(paths.generations(it), paths.root)},
        metrics={"records": n, "problems": len(problems), "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0},
    )
    return n


# -- verification ------------------------------------------------------------------------------


def verify(cfg: RunConfig, it: int, *, job_id: str | None = None, progress: bool = True) -> dict:
    """Keep the teacher rationales whose final answer matches the gold answer; record the
    problems the teacher could not solve instead of dropping them silently."""
    paths, manifest = open_run(cfg)
    manifest.mark(it, "verify", "running", job_id=job_id)
    graded = grade_in_place(read_jsonl(paths.generations(it)), progress=progress)
    correct = [r for r in graded if r["correct"]]
    kept, threshold = filter_rationales(correct, cfg.verify.filter)
    solved = {r["problem_id"] for r in correct}
    unsolved = {r["problem_id"]: {"id": r["problem_id"], "question": r["question"], "gold": r["gold"],
                                  "last_response": r["response"]} for r in graded if r["problem_id"] not in solved}
    write_jsonl(paths.graded(it), graded)
    write_jsonl(paths.verified(it), kept)
    write_jsonl(paths.unsolved(it), unsolved.values())
    metrics = {
        "records": len(graded),
        "kept": len(kept),
        "teacher_accuracy": round(len(correct) / len(graded), 4) if graded else 0.0,
        **({"filter": cfg.verify.filter, "correct": len(correct), "filter_threshold": threshold}
           if cfg.verify.filter != "none" else {}),
        "problems_solved": len(solved),
        "problems_unsolved": len(unsolved),
        **{f"kept_{k}": v for k, v in length_stats([r["n_tokens"] for r in kept]).items()},
    }
    manifest.mark(
        it, "verify", "done", metrics=metrics,
        artifacts={"graded": artifact(paths.graded(it), paths.root), "verified": artifact(paths.verified(it), paths.root),
                   "unsolved": artifact(paths.unsolved(it), paths.root)},
    )
    return metrics


# -- the training set --------------------------------------------------------------------------


def combine(new: list[dict[str, Any]], old: list[dict[str, Any]], policy: str, cap: int) -> list[dict[str, Any]]:
    """D_N from the new verified rationales and D_{N-1}: newest first, no duplicate
    (problem, rationale) pairs, at most `cap` rationales per problem.

    `replace` drops a problem's old rationales once it has new ones; `accumulate` keeps them.
    """
    if policy == "replace":
        fresh = {r["problem_id"] for r in new}
        old = [r for r in old if r["problem_id"] not in fresh]
    seen: set[tuple[str, str]] = set()
    per_problem: dict[str, int] = defaultdict(int)
    out = []
    for r in new + old:
        key = (r["problem_id"], " ".join(r["response"].split()))
        if key in seen or per_problem[r["problem_id"]] >= cap:
            continue
        seen.add(key)
        per_problem[r["problem_id"]] += 1
        out.append(r)
    return out


def build_training_set(cfg: RunConfig, it: int) -> list[dict[str, Any]]:
    paths = RunPaths(cfg.run_dir)
    new = [{**r, "iteration": it} for r in read_jsonl(paths.verified(it))]
    old = read_jsonl(paths.train_data(it - 1)) if it > 0 else []
    records = combine(new, old, cfg.undo.dataset, cfg.undo.cap_per_problem)
    write_jsonl(paths.train_data(it), records)
    return records


# -- training ----------------------------------------------------------------------------------


def _pairs(cfg: RunConfig, records: list[dict[str, Any]], tokenizer: Any) -> list[tuple[str, str]]:
    """(student prompt, teacher rationale): the student sees the plain prompt, never the
    teacher's error-conditioned one."""
    return [(build_prompt(tokenizer, cfg.prompt, r["question"]), r["response"]) for r in records]


def _steps_so_far(manifest: Manifest, it: int) -> int:
    return sum(manifest.stage(i, "train").get("metrics", {}).get("step", 0) for i in range(it + 1))


def train_student(
    cfg: RunConfig, it: int, *, baseline: bool = False, job_id: str | None = None,
    should_stop: Callable[[], bool] | None = None, progress: bool = True,
):
    """Train this iteration's student, or (`baseline`) the one-shot student: iteration 0's data
    for as many optimizer steps as UNDO spent in iterations 0..it."""
    import dataclasses

    from transformers import AutoTokenizer

    from distill.training import train

    paths, manifest = open_run(cfg)
    stage = "baseline_train" if baseline else "train"
    manifest.mark(it, stage, "running", job_id=job_id)
    try:
        tcfg = cfg.train
        if baseline:
            records = read_jsonl(paths.train_data(0))
            tcfg = dataclasses.replace(cfg.train, max_steps=_steps_so_far(manifest, it))
            init, out = cfg.models.student, paths.baseline_dir(it)
        else:
            records = build_training_set(cfg, it)
            previous = it > 0 and cfg.undo.init == "previous"
            init, out = (paths.student(it - 1) if previous else cfg.models.student), paths.train_dir(it)
        if not records:
            raise DistillError(f"{paths.verified(it)}: no verified rationales to train on")
        tokenizer = AutoTokenizer.from_pretrained(str(init))
        result = train(init, _pairs(cfg, records, tokenizer), tcfg, out, should_stop=should_stop, progress=progress,
                       teacher_path=cfg.models.teacher, attn_implementation=cfg.models.attn_implementation)
    except BaseException as exc:
        manifest.mark(it, stage, "failed", error=_one_line(exc))
        raise
    metrics = {"step": result.step, "total_steps": result.total_steps, "loss": result.loss,
               "tokens_per_s": result.tokens_per_s, "examples": len(records),
               "problems": len({r["problem_id"] for r in records})}
    extra = {"resumed_from": result.resumed_from} if result.resumed_from is not None else {}
    if not result.finished:
        manifest.mark(it, stage, "pending", metrics=metrics, **extra)
        return result
    manifest.mark(it, stage, "done", metrics=metrics, artifacts={"model": artifact(result.model_dir, paths.root)}, **extra)
    return result


# -- evaluation --------------------------------------------------------------------------------


def eval_models(cfg: RunConfig, it: int, stage: str = "evaluate") -> dict[str, str]:
    """label -> model directory for this iteration's evaluation (or the baseline's)."""
    paths = RunPaths(cfg.run_dir)
    if stage == "baseline_evaluate":
        return {"oneshot": str(paths.baseline_dir(it) / "model")}
    models = {"student": str(paths.student(it))}
    if it == 0 and cfg.eval.baselines:
        models = {"teacher": cfg.models.teacher, "base": cfg.models.student, **models}
    return models


def eval_units(cfg: RunConfig, it: int, stage: str = "evaluate") -> list[tuple[str, int]]:
    return [(label, s) for label in eval_models(cfg, it, stage) for s in range(cfg.eval.num_shards)]


def evaluate_shard(
    cfg: RunConfig, it: int, label: str, shard: int, *, stage: str = "evaluate",
    job_id: str | None = None, progress: bool = True,
) -> dict:
    """Generate greedily with one model on a slice of the eval split, then grade the slice."""
    paths, manifest = open_run(cfg)
    num = cfg.eval.num_shards
    key = f"{label}:{shard}"
    manifest.mark_shard(it, stage, key, "running", job_id=job_id)
    try:
        problems = shard_slice(eval_problems(cfg), shard, num)
        role = "teacher" if label == "teacher" else "student"
        backend = load_backend(engine_for(cfg, role, logprobs=False), eval_models(cfg, it, stage)[label])
        tasks = [{"id": p["id"], "prompt": build_prompt(backend.tokenizer, cfg.prompt, p["question"]),
                  "question": p["question"], "gold": p["gold"], "model": label, **_meta(p)} for p in problems]
        out = paths.eval_shard(it, label, shard, num)
        stats = generate_shard(
            backend, tasks, out, SamplingSpec(max_new_tokens=cfg.eval.max_new_tokens),
            cfg.eval.batch_size, desc=f"eval {label} {shard}/{num}", progress=progress,
        )
        write_jsonl(out.with_suffix(".graded.jsonl"), grade_in_place(read_jsonl(out), progress=progress))
    except BaseException as exc:
        manifest.mark_shard(it, stage, key, "failed", error=_one_line(exc))
        raise
    manifest.mark_shard(it, stage, key, "done", **stats)
    return stats


def merge_evaluation(cfg: RunConfig, it: int, stage: str = "evaluate") -> dict[str, dict]:
    paths, manifest = open_run(cfg)
    num = cfg.eval.num_shards
    problems = eval_problems(cfg)
    expected = [[p["id"] for p in shard_slice(problems, s, num)] for s in range(num)]
    all_metrics, artifacts = {}, {}
    for label in eval_models(cfg, it, stage):
        graded_paths = [paths.eval_shard(it, label, s, num).with_suffix(".graded.jsonl") for s in range(num)]
        out = paths.eval_dir(it, label) / "graded.jsonl"
        merge_or_reopen(manifest, it, stage, [f"{label}:{s}" for s in range(num)], graded_paths, expected, 1, out)
        metrics = summarize(read_jsonl(out))
        write_json(paths.eval_dir(it, label) / "metrics.json", metrics)
        all_metrics[label] = metrics
        artifacts[label] = artifact(out, paths.root)
    summary = {f"{label}_acc": m["accuracy"] for label, m in all_metrics.items()}
    manifest.mark(it, stage, "done", num_shards=num * len(all_metrics), metrics=summary,
                  results=all_metrics, artifacts=artifacts)
    return all_metrics
