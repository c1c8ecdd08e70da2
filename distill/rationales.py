"""The teacher's stages: `generate` writes rationales in shards, `verify` keeps the correct ones.

Iteration 0 asks the teacher about the training problems; an UNDO iteration asks it about the
problems the student got wrong (`distill.mining`), with the error-conditioned template.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import Any

from distill.config import RunConfig
from distill.data import shard_slice
from distill.efficiency import filter_rationales, length_stats
from distill.generation import LazyBackend, SamplingSpec, engine_for, generate_shard, merge_shards, task
from distill.grading import grade_records
from distill.integrity import artifact, bind
from distill.jsonl import read_jsonl, write_jsonl
from distill.layout import RunPaths
from distill.manifest import stage_entry
from distill.mining import MINE
from distill.problems import train_problems
from distill.prompts import build_prompt
from distill.stage import FIRST, UNDO, Result, Stage, Unit, merged


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


# -- generate --------------------------------------------------------------------------------------


def generation_shards(cfg: RunConfig, it: int) -> list[str]:
    return [str(s) for s in range(cfg.generation.num_shards)]


def generate(unit: Unit) -> Result:
    """One shard of the teacher's rationales (resumes from the records already written)."""
    cfg, it, shard, num = unit.cfg, unit.iteration, int(unit.key), unit.cfg.generation.num_shards
    problems = shard_slice(generation_problems(cfg, it), shard, num)
    out = unit.paths.gen_shard(it, shard, num)
    template = cfg.prompt.template if it == 0 else cfg.undo.template
    bind(out, {"model": unit.model_identity(cfg.models.teacher), "prompt": asdict(cfg.prompt), "template": template,
               "sampling": asdict(teacher_spec(cfg, it)), "tasks": unit.inputs.get(MINE.output("errors", it))})
    with LazyBackend(engine_for(cfg, "teacher"), cfg.models.teacher) as teacher:
        backend = teacher.get()
        tasks = [task(p, teacher_prompt(cfg, backend.tokenizer, p, it)) for p in problems]
        stats = generate_shard(backend, tasks, out, teacher_spec(cfg, it),
                               cfg.generation.batch_size, desc=f"generate shard {shard}/{num}", progress=unit.progress)
    return Result(stats)


def recover_generation(unit: Unit) -> Result | None:
    """A shard holding every sample of every one of its problems."""
    cfg, it, shard, num = unit.cfg, unit.iteration, int(unit.key), unit.cfg.generation.num_shards
    out = unit.paths.gen_shard(it, shard, num)
    if not out.exists():
        return None
    have = Counter(r["problem_id"] for r in read_jsonl(out))
    if any(have[p["id"]] < teacher_spec(cfg, it).n for p in shard_slice(generation_problems(cfg, it), shard, num)):
        return None
    return Result({"records": sum(have.values())})


def merge_generation(cfg: RunConfig, it: int, paths: RunPaths, entry: dict[str, Any]) -> dict[str, Any]:
    num = cfg.generation.num_shards
    problems = generation_problems(cfg, it)
    expected = [[p["id"] for p in shard_slice(problems, s, num)] for s in range(num)]
    outputs = {str(s): paths.gen_shard(it, s, num) for s in range(num)}
    n = merged(outputs, lambda files: merge_shards(files, expected, teacher_spec(cfg, it).n, paths.generations(it)))
    shards = entry.get("shards", {}).values()
    tokens, seconds = sum(s.get("new_tokens", 0) for s in shards), sum(s.get("seconds", 0) for s in shards)
    return {"num_shards": num, "artifacts": {"generations": artifact(paths.generations(it), paths.root)},
            "metrics": {"records": n, "problems": len(problems),
                        "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0}}


GENERATE = Stage(
    "generate", generate, plans=(FIRST, UNDO), units=generation_shards, sharded=True, merge=merge_generation,
    inputs=lambda cfg, it: [MINE.output("errors", it)] if it > 0 else [], recover=recover_generation,
    produces=("generations",),
    summary=lambda e: f"merged {e['metrics']['records']} records from {e['num_shards']} shard(s)",
)


# -- verify ----------------------------------------------------------------------------------------


def verify(unit: Unit) -> Result:
    """Keep the teacher rationales whose final answer matches the gold answer; record the
    problems the teacher could not solve instead of dropping them silently."""
    cfg, it, paths = unit.cfg, unit.iteration, unit.paths
    graded = grade_records(read_jsonl(paths.generations(it)), progress=unit.progress)
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
        **({"warning": f"verify kept {len(kept)} rationale(s), fewer than verify.min_rationales "
                       f"({cfg.verify.min_rationales}): the student trains on them alone"}
           if 0 < len(kept) < cfg.verify.min_rationales else {}),
        "problems_unsolved": len(unsolved),
        **{f"kept_{k}": v for k, v in length_stats([r["n_tokens"] for r in kept]).items()},
    }
    artifacts = {name: artifact(path, paths.root) for name, path in
                 (("graded", paths.graded(it)), ("verified", paths.verified(it)), ("unsolved", paths.unsolved(it)))}
    return Result({"metrics": metrics, "artifacts": artifacts})


def recover_verify(unit: Unit) -> Result | None:
    """Its three files, readable: verify is a pure function of the merged generations."""
    paths, it = unit.paths, unit.iteration
    files = {"graded": paths.graded(it), "verified": paths.verified(it), "unsolved": paths.unsolved(it)}
    if not all(p.exists() for p in files.values()):
        return None
    graded, kept = read_jsonl(files["graded"]), read_jsonl(files["verified"])
    metrics = {"records": len(graded), "kept": len(kept), "problems_unsolved": len(read_jsonl(files["unsolved"]))}
    return Result({"metrics": metrics, "artifacts": {k: artifact(p, paths.root) for k, p in files.items()}})


def rationales_kept(cfg: RunConfig, it: int, manifest: dict[str, Any]) -> str | None:
    """Training's gate: a verify that kept no rationale leaves nothing new to train on (in an
    UNDO iteration the student would retrain on the previous iteration's data), so training is
    refused before it is submitted, with what to change."""
    metrics = stage_entry(manifest, it, VERIFY.name).get("metrics", {})
    if metrics.get("kept", 1) > 0:
        return None
    done = (f"none of the teacher's {metrics.get('records', 0)} new rationales for the mined errors was correct: "
            f"iteration {it - 1}'s student stays the last (the UNDO loop stops here)" if it > 0 else
            f"none of the teacher's {metrics.get('records', 0)} rationales was correct: check the teacher's answers "
            "and the gold answers, or raise generation.n or generation.max_new_tokens in a new run")
    return f"iteration {it}: verify kept 0 rationales, so there is nothing to train on: {done}"


VERIFY = Stage(
    "verify", verify, plans=(FIRST, UNDO), inputs=lambda cfg, it: [GENERATE.output("generations", it)],
    produces=("graded", "verified", "unsolved"),
    recover=recover_verify,
    summary=lambda e: (f"kept {e['metrics']['kept']} of {e['metrics']['records']} rationales; "
                       f"{e['metrics']['problems_unsolved']} problem(s) unsolved by the teacher"
                       + (f"; warning: {e['metrics']['warning']}" if "warning" in e["metrics"] else "")),
)
