"""One student per distillation objective, trained at equal steps on a run's iteration-0
rationales and evaluated on its held-out split, side by side.

    python -m distill compare --config configs/tiny.yaml --objectives sft,kd,ekd,context,feature [--seeds 0 1 2]

Each objective trains into `<run>/compare/steps-<N>/<name>/` with the same checkpoints as the
train stage, so an interrupted comparison resumes; evaluation goes through `distill.evaluation`
into `<run>/compare/steps-<N>/eval/`. The table lands beside them in `compare.md` and
`compare.json`. With `--seeds` each objective trains once per `train.seed` (`<name>-seed<s>/`) and
its row gives the mean ± sample sd of the accuracy with every seed's value, plotted in
`compare.png`: single runs of a small student move by many points with the seed alone.
"""

from __future__ import annotations

import dataclasses
import statistics
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
            progress: bool = True, seeds: list[int] | None = None) -> str:
    """Train and evaluate one student per objective (per objective and seed, with `seeds`: each
    row is then the mean ± sd over the seeds, with every seed's value); the markdown table."""
    from distill.evaluation import EvalSettings, run_eval
    from distill.generation import engine_for
    from distill.layout import RunPaths

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
    runs = {(name if seed is None else f"{name}-seed{seed}"): (name, seed)
            for name in names for seed in seeds or [None]}
    models: dict[str, str] = {}
    rows: dict[str, dict[str, Any]] = {}
    for label, (name, seed) in runs.items():
        cfg = load_config(config, [*overrides, *sets[name], f"train.max_steps={steps}",
                                   *([f"train.seed={seed}"] if seed is not None else [])])
        models[label], rows[label] = trained(cfg, records, root / label, progress)
    split = base.eval.split
    engine = engine_for(base, "student", logprobs=False)  # the students run as the eval stage runs them
    settings = EvalSettings(source=str(getattr(base.data, split)), limit=base.eval.limit,
                            max_new_tokens=base.eval.max_new_tokens, prompt=base.prompt, backend=engine.backend,
                            data=dataclasses.replace(base.data, test=None))
    summaries = run_eval(settings, models, root / "eval", batch_size=base.eval.batch_size, engine=engine,
                         progress=progress)
    for label, s in summaries.items():
        rows[label] |= {"accuracy": s["accuracy"], "n": s["n"], "tokens_mean": s["tokens_mean"]}
    if seeds:
        rows = {name: pooled([rows[f"{name}-seed{seed}"] for seed in seeds], seeds) for name in names}
        plot(rows, root / "compare.png", f"{base.name}: {split} accuracy over seeds {', '.join(map(str, seeds))}")
    text = table(rows)
    n = next(iter(rows.values()))["n"] if rows else 0
    atomic_write_text(root / "compare.md", f"# Objectives on {base.name}: {split} split, {n} problems\n\n{text}")
    write_json(root / "compare.json", rows)
    return text


def trained(cfg: Any, records: list[dict[str, Any]], out_dir: Path, progress: bool) -> tuple[str, dict[str, Any]]:
    """One student of the comparison (resumed if it was interrupted): its model and its row."""
    from transformers import AutoTokenizer

    from distill.evaluation import read_json_or_none
    from distill.layout import TrainPaths
    from distill.prompts import training_pairs
    from distill.training import train

    out = TrainPaths(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.models.student))
    start = time.perf_counter()
    result = train(cfg.models.student, training_pairs(cfg.prompt, records, tokenizer), cfg.train, out.root,
                   progress=progress, teacher_path=cfg.models.teacher,
                   attn_implementation=cfg.models.attn_implementation)
    if result.resumed_from is None:  # trained start to finish in this call: a time worth keeping
        write_json(out.timing, {"train_s": round(time.perf_counter() - start, 3), "tokens_per_s": result.tokens_per_s})
    timing = read_json_or_none(out.timing) or {"train_s": None, "tokens_per_s": None}
    topk = read_json_or_none(out.topk_info)
    return str(result.model_dir), {
        "settings": objectives.build(cfg.train).describe(), "steps": result.step, "loss": result.loss, **timing,
        "topk_bytes_per_token": topk and round(int(topk["file_bytes"]) / int(topk["tokens"]), 1)}


def pooled(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """One objective's row over its seeds: the mean and sample sd of the accuracy, every seed's
    accuracy, the mean tokens and training time."""
    accuracies = [r["accuracy"] for r in runs]
    times = [r["train_s"] for r in runs if r["train_s"] is not None]
    return {**{k: runs[0][k] for k in ("settings", "steps", "n", "topk_bytes_per_token")}, "seeds": seeds,
            "accuracies": accuracies, "accuracy": round(statistics.mean(accuracies), 4),
            "accuracy_sd": round(statistics.stdev(accuracies), 4) if len(runs) > 1 else 0.0,
            "tokens_mean": round(statistics.mean(r["tokens_mean"] for r in runs), 2),
            "train_s": round(statistics.mean(times), 1) if times else None}


def table(rows: dict[str, dict[str, Any]]) -> str:
    """The comparison as a markdown table, one row per objective."""
    seeded = any("seeds" in r for r in rows.values())
    acc = "test acc, mean ± sd (per seed)" if seeded else "test acc"
    lines = [f"| objective | settings | steps | {acc} | mean tokens | train s | bytes/token stored |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        stored = f"{r['topk_bytes_per_token']}" if r["topk_bytes_per_token"] else "-"
        train_s = "-" if r["train_s"] is None else f"{r['train_s']:.1f}"
        value = f"{100 * r['accuracy']:.1f}%"
        if "seeds" in r:
            value = (f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_sd']:.1f}% "
                     f"({', '.join(f'{100 * a:.1f}' for a in r['accuracies'])})")
        lines.append(f"| {name} | {r['settings']} | {r['steps']} | {value} | {r['tokens_mean']} | "
                     f"{train_s} | {stored} |")
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Each objective's mean accuracy with its sd as an error bar and every seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.5))
    for i, r in enumerate(rows.values()):
        ax.bar(i, 100 * r["accuracy"], yerr=100 * r["accuracy_sd"], capsize=4, color="#9ecae1")
        ax.plot([i] * len(r["accuracies"]), [100 * a for a in r["accuracies"]], "k.")
    ax.set_xticks(range(len(rows)), list(rows), rotation=20)
    ax.set_ylabel("accuracy, %")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
