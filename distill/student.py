"""The student's stages: `train` fits this iteration's student on the training set D_it, and
`baseline_train` the one-shot student (iteration 0's data at UNDO's total student compute).

Training stops only at a safe point: after an optimizer step, with a checkpoint saved there
(`Unit.should_stop`); the next allocation resumes from it (`distill.training`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.config import RunConfig, iteration_train
from distill.errors import DistillError
from distill.integrity import Input, artifact
from distill.jsonl import read_jsonl, write_jsonl
from distill.layout import CKPT_RE, RunPaths, TrainPaths, newest_checkpoint
from distill.manifest import stage_entry
from distill.prompts import training_pairs
from distill.rationales import VERIFY, rationales_kept
from distill.scoring import SCORE, needed
from distill.stage import BASELINE, FIRST, UNDO, Result, Stage, Unit
from distill.training_set import combine, training_set  # noqa: F401 - callers import combine here

log = logging.getLogger(__name__)


def build_training_set(cfg: RunConfig, it: int) -> list[dict[str, Any]]:
    records = training_set(cfg, it)
    write_jsonl(RunPaths(cfg.run_dir).train_data(it), records)
    return records


def steps_so_far(manifest: dict[str, Any], it: int) -> int:
    """Optimizer steps the UNDO students took in iterations 0..it."""
    return sum(stage_entry(manifest, i, "train").get("metrics", {}).get("step", 0) for i in range(it + 1))


def fit(unit: Unit, records: list[dict[str, Any]], init: Any, out: TrainPaths, cfg_train: Any,
        scores: Path | None = None) -> Result:
    """Train on `records` from `init`; `scores` is the score stage's teacher top-k for them."""
    from distill.modeling import load_tokenizer
    from distill.training import Focus, train

    cfg = unit.cfg
    if not records:
        raise DistillError(f"{unit.paths.verified(unit.iteration)}: no verified rationales to train on")
    tokenizer = load_tokenizer(init)
    pairs = training_pairs(cfg.prompt, records, tokenizer)
    focus = None
    if unit.iteration > 0 and cfg.undo.onpolicy_errors > 0:  # the prompts of the mined errors' rationales
        errors = [r for r in records if r.get("iteration") == unit.iteration]
        focus = Focus(frozenset(p for p, _ in training_pairs(cfg.prompt, errors, tokenizer)), cfg.undo.onpolicy_errors)
    result = train(init, pairs, cfg_train, out.root, should_stop=unit.should_stop, progress=unit.progress,
                   teacher_path=cfg.models.teacher, attn_implementation=cfg.models.attn_implementation, focus=focus,
                   topk_store=scores)
    metrics = {"step": result.step, "total_steps": result.total_steps, "loss": result.loss,
               "tokens_per_s": result.tokens_per_s, "examples": len(records),
               "problems": len({r["problem_id"] for r in records})}
    fields: dict[str, Any] = {"metrics": metrics}
    if result.resumed_from is not None:
        fields["resumed_from"] = result.resumed_from
    if not result.finished:
        return Result(fields, stopped=True)
    return Result(fields | {"artifacts": {"model": artifact(result.model_dir, unit.paths.root, result.model_sha256)}})


def train_student(unit: Unit) -> Result:
    """This iteration's student, from the base model or (`undo.init: previous`) the last one."""
    cfg, it, paths = unit.cfg, unit.iteration, unit.paths
    records = build_training_set(cfg, it)
    init = paths.student(it - 1) if it > 0 and cfg.undo.init == "previous" else cfg.models.student
    tcfg = iteration_train(cfg, it)
    scores = paths.scores(it, tcfg.kd.top_k) if needed(cfg, it) else None
    result = fit(unit, records, init, paths.train(it), tcfg, scores)
    if not result.stopped:
        result.fields["artifacts"]["train_data"] = artifact(paths.train_data(it), paths.root)
    return result


def train_inputs(cfg: RunConfig, it: int) -> list[Input]:
    """The verified set; from iteration 1 also D_{it-1}, and the last student when it is the init."""
    previous = [TRAIN.output("train_data", it - 1)] if it > 0 else []
    if it > 0 and cfg.undo.init == "previous":
        previous.append(TRAIN.output("model", it - 1))
    scores = [SCORE.output("topk", it)] if needed(cfg, it) else []
    return [VERIFY.output("verified", it), *previous, *scores]


def train_oneshot(unit: Unit) -> Result:
    """The one-shot student: iteration 0's data for as many optimizer steps as UNDO spent in
    iterations 0..it, from the base model."""
    it, paths = unit.iteration, unit.paths
    tcfg = dataclasses.replace(unit.cfg.train, max_steps=steps_so_far(unit.manifest, it))
    scores = paths.scores(0, tcfg.kd.top_k) if needed(unit.cfg, 0) else None  # iteration 0's data, so its store
    return fit(unit, read_jsonl(paths.train_data(0)), unit.cfg.models.student, paths.baseline(it), tcfg, scores)


def _recover(out: Any, *extra: tuple[str, Any]) -> Callable[[Unit], Result | None]:
    def recover(unit: Unit) -> Result | None:
        """A saved model beside a sound checkpoint at the last step, recorded as saved from that
        checkpoint, unchanged since and finite (`distill.training.model_damage`): nothing the
        files cannot show is taken on trust, and a model that fails goes back to training, which
        saves it again from the checkpoint."""
        from distill.training import model_damage, resumable_checkpoint

        train_paths = out(unit.paths, unit.iteration)
        ckpt = resumable_checkpoint(train_paths.checkpoints)
        if ckpt is None or not train_paths.model.is_dir():
            return None
        state = json.loads((ckpt / "state.json").read_text())
        if state["step"] < state["total_steps"]:
            return None
        metrics = {"step": state["step"], "total_steps": state["total_steps"], "loss": state.get("loss")}
        model = artifact(train_paths.model, unit.paths.root)
        damage = model_damage(train_paths, ckpt, model["sha256"])
        if damage is not None:
            log.warning("%s: not recovered (%s): it is saved again from %s on the next run", train_paths.model,
                        damage, ckpt.name)
            return None
        artifacts = {"model": model}
        for name, path in extra:
            artifacts[name] = artifact(path(unit.paths, unit.iteration), unit.paths.root)
        return Result({"metrics": metrics, "artifacts": artifacts})
    return recover


def _summary(entry: dict[str, Any]) -> str:
    m = entry.get("metrics", {})
    return (f"step {m.get('step')} of {m.get('total_steps')}, loss {m.get('loss')}, "
            f"{entry.get('allocations', 1)} allocation(s)")


def _distributed(cfg: RunConfig) -> bool:
    return cfg.train.distributed != "none"


def _resume_point(name: str, out: TrainPaths) -> str:
    ckpt = newest_checkpoint(out.checkpoints)
    return f"{name} resumes from step {int(CKPT_RE.match(ckpt.name).group(1))}" if ckpt else ""


TRAIN = Stage("train", train_student, plans=(FIRST, UNDO), inputs=train_inputs, stops_anywhere=False,
              ready=rationales_kept, produces=("model", "train_data"),
              summary=_summary, recover=_recover(RunPaths.train, ("train_data", RunPaths.train_data)),
              resume_point=lambda paths, it: _resume_point("train", paths.train(it)), distributed=_distributed)
BASELINE_TRAIN = Stage("baseline_train", train_oneshot, plans=(BASELINE,),
                       inputs=lambda cfg, it: [TRAIN.output("train_data", 0),
                                               *([SCORE.output("topk", 0)] if needed(cfg, 0) else [])],
                       stops_anywhere=False,
                       resources=TRAIN.resource_section, produces=("model",), summary=_summary,
                       recover=_recover(RunPaths.baseline),
                       resume_point=lambda paths, it: _resume_point("baseline_train", paths.baseline(it)),
                       distributed=_distributed)
