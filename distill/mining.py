"""The `mine` stage of an UNDO iteration: the previous student answers the probe split, and
its wrong answers, with the rationale it was trained on for each, become the teacher's tasks."""

from __future__ import annotations

from dataclasses import asdict

from distill.config import RunConfig
from distill.generation import LazyBackend, SamplingSpec, engine_for, generate_shard, task
from distill.grading import grade_records
from distill.integrity import Input, artifact, bind
from distill.jsonl import iter_jsonl, read_jsonl, write_jsonl
from distill.layout import RunPaths
from distill.problems import probe_problems
from distill.prompts import build_prompt
from distill.stage import UNDO, Result, Stage, Unit


def previous_rationales(cfg: RunConfig, it: int) -> dict[str, str]:
    """problem id -> the newest rationale the student was trained on before iteration `it`."""
    latest: dict[str, str] = {}
    for r in iter_jsonl(RunPaths(cfg.run_dir).train_data(it - 1)):
        latest.setdefault(r["problem_id"], r["response"])  # records are newest first
    return latest


def mine(unit: Unit) -> Result:
    """Probe the previous student greedily; its wrong answers become the teacher's next tasks."""
    cfg, it, paths = unit.cfg, unit.iteration, unit.paths
    out, spec = paths.mine_responses(it), SamplingSpec(max_new_tokens=cfg.eval.max_new_tokens)
    bind(out, {"model": unit.model_identity(paths.student(it - 1)), "prompt": asdict(cfg.prompt),
               "sampling": asdict(spec)})
    with LazyBackend(engine_for(cfg, "student"), paths.student(it - 1)) as student:
        backend = student.get()
        tasks = [task(p, build_prompt(backend.tokenizer, cfg.prompt, p["question"])) for p in probe_problems(cfg)]
        generate_shard(backend, tasks, out, spec, cfg.eval.batch_size, desc="mine", progress=unit.progress)
    graded = grade_records(read_jsonl(out), progress=unit.progress)
    write_jsonl(paths.mine_graded(it), graded)
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
    return Result({"metrics": metrics, "artifacts": {"errors": artifact(paths.errors(it), paths.root)}})


def recover_mine(unit: Unit) -> Result | None:
    paths, it = unit.paths, unit.iteration
    if not (paths.errors(it).exists() and paths.mine_graded(it).exists()):
        return None
    graded, errors = read_jsonl(paths.mine_graded(it)), read_jsonl(paths.errors(it))
    return Result({"metrics": {"probed": len(graded), "errors": len(errors)},
                   "artifacts": {"errors": artifact(paths.errors(it), paths.root)}})


MINE = Stage(
    "mine", mine, plans=(UNDO,), recover=recover_mine,
    # The loop's one back edge, the previous iteration's student and its data, is named here rather
    # than through `TRAIN.output`: importing the train stage would close an import circle
    # (train reads verify's rationales, generate reads these errors).
    inputs=lambda cfg, it: [Input(it - 1, "train", "model"), Input(it - 1, "train", "train_data")],
    produces=("errors",),
    summary=lambda e: (f"the previous student: {e['metrics']['errors']} errors "
                       f"on {e['metrics']['probed']} probe problems"),
)
