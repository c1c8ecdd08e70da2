"""One student per distillation objective, trained at equal steps on a run's iteration-0
rationales and evaluated on its held-out split, side by side.

    python -m distill compare --config configs/tiny.yaml --objectives sft,kd,ekd,context,feature

Each objective trains into `<run>/compare/steps-<N>/<name>/` with the same checkpoints as the
train stage, so an interrupted comparison resumes; evaluation goes through `distill.evaluation`
into `<run>/compare/steps-<N>/eval/`. The table lands beside them in `compare.md` and
`compare.json`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from distill import objectives
from distill.config import load_config
from distill.errors import DistillError
from distill.jsonl import atomic_write_text, read_jsonl, write_json


def overrides_for(name: str) -> list[str]:
    """`--set` overrides that make the run's config train `name`: a preset of an objective
    (`kd-offline`), or an objective by its name or module path."""
    found = objectives.presets().get(name)
    if found is not None:
        return found
    try:
        objectives.get(name)
    except DistillError as exc:
        raise DistillError(f"--objectives: unknown {name!r} (presets: {', '.join(objectives.presets())}; "
                           f"objectives: {exc})") from None
    return [f"train.objective={name}"]


def compare(config: str | Path, names: list[str], overrides: list[str], steps: int | None,
            progress: bool = True) -> str:
    from transformers import AutoTokenizer

    from distill.evaluation import EvalSettings, read_json_or_none, run_eval
    from distill.layout import RunPaths, TrainPaths
    from distill.prompts import training_pairs
    from distill.training import train

    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    sets = {name: overrides_for(name) for name in names}
    base = load_config(config, overrides)
    paths = RunPaths(base.run_dir)
    verified = paths.verified(0)
    if not verified.exists():
        raise DistillError(f"{verified}: not found; run iteration 0 first (make iter ITER=0) "
                           "for the rationales to train on")
    records = read_jsonl(verified)
    steps = steps or base.train.max_steps
    if steps is None:
        raise DistillError("--steps: needed when the config sets no train.max_steps (students compare at equal steps)")
    root = paths.compare(steps)
    models: dict[str, str] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        cfg = load_config(config, [*overrides, *sets[name], f"train.max_steps={steps}"])
        out = TrainPaths(root / name)
        tokenizer = AutoTokenizer.from_pretrained(str(cfg.models.student))
        start = time.perf_counter()
        result = train(cfg.models.student, training_pairs(cfg.prompt, records, tokenizer), cfg.train, out.root,
                       progress=progress, teacher_path=cfg.models.teacher,
                       attn_implementation=cfg.models.attn_implementation)
        models[name] = str(result.model_dir)
        if result.resumed_from is None:  # trained start to finish in this call: a time worth keeping
            write_json(out.timing, {"train_s": round(time.perf_counter() - start, 3),
                                    "tokens_per_s": result.tokens_per_s})
        timing = read_json_or_none(out.timing) or {"train_s": None, "tokens_per_s": None}
        topk = read_json_or_none(out.topk_info)
        rows[name] = {"settings": objectives.build(cfg.train).describe(), "steps": result.step,
                      "loss": result.loss, **timing,
                      "topk_bytes_per_token": topk and round(int(topk["file_bytes"]) / int(topk["tokens"]), 1)}
    split = base.eval.split
    settings = EvalSettings(source=str(getattr(base.data, split)), limit=base.eval.limit,
                            max_new_tokens=base.eval.max_new_tokens, prompt=base.prompt,
                            data=dataclasses.replace(base.data, test=None))
    summaries = run_eval(settings, models, root / "eval", batch_size=base.eval.batch_size, progress=progress)
    for name, s in summaries.items():
        rows[name] |= {"accuracy": s["accuracy"], "n": s["n"], "tokens_mean": s["tokens_mean"]}
    text = table(rows)
    n = next(iter(rows.values()))["n"] if rows else 0
    atomic_write_text(root / "compare.md", f"# Objectives on {base.name}: {split} split, {n} problems\n\n{text}")
    write_json(root / "compare.json", rows)
    return text


def table(rows: dict[str, dict[str, Any]]) -> str:
    """The comparison as a markdown table, one row per objective."""
    lines = ["| objective | settings | steps | test acc | mean tokens | train s | bytes/token stored |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        stored = f"{r['topk_bytes_per_token']}" if r["topk_bytes_per_token"] else "-"
        train_s = "-" if r["train_s"] is None else f"{r['train_s']:.1f}"
        lines.append(f"| {name} | {r['settings']} | {r['steps']} | {100 * r['accuracy']:.1f}% | {r['tokens_mean']} | "
                     f"{train_s} | {stored} |")
    return "\n".join(lines) + "\n"
