"""The run report: what each iteration measured, read from the manifest alone.

Every number in `report.md`, `report.json` and `report.png` comes from the manifest's stage
metrics, so the report can be rebuilt at any time and never disagrees with the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.cost import cost_rows, duration
from distill.curves import write_evaluations
from distill.efficiency import table_cell
from distill.errors import DistillError
from distill.evaluation import BASELINE_EVALUATE, EVALUATE
from distill.jsonl import atomic_write_text, write_json
from distill.layout import RunPaths
from distill.manifest import Manifest
from distill.mining import MINE
from distill.pipeline import STAGES, names
from distill.rationales import VERIFY
from distill.records import ModelResult, StageRecord
from distill.stage import BASELINE
from distill.student import BASELINE_TRAIN, TRAIN

COLUMNS = [
    ("model", "model"), ("iteration", "iter"), ("accuracy", "test acc"), ("flexible_accuracy", "flexible acc"),
    ("train_rationales", "train rationales"),
    ("errors_mined", "errors mined"), ("regenerated", "new verified"), ("teacher_unsolved", "teacher unsolved"),
    ("student_steps", "student steps"), ("tokens_mean", "mean tokens"),
]


def _metrics(data: dict[str, Any], it: str, stage: str) -> dict[str, Any]:
    return StageRecord.of(data, it, stage).metrics


def _result(data: dict[str, Any], it: str, stage: str, label: str) -> ModelResult | None:
    return StageRecord.of(data, it, stage).result(label)


def _accuracies(res: ModelResult) -> dict[str, float]:
    """Strict accuracy, and the flexible one where the run recorded it."""
    flexible = {} if res.flexible_accuracy is None else {"flexible_accuracy": res.flexible_accuracy}
    return {"accuracy": res.accuracy, **flexible}


def build_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluated model: teacher, untrained student, the student of each
    iteration, and each one-shot baseline."""
    iters = sorted(data.get("iterations", {}), key=int)
    rows: list[dict[str, Any]] = []
    for label, name in (("teacher", "teacher"), ("base", "student (untrained)")):
        res = _result(data, "0", EVALUATE.name, label)
        if res:
            rows.append({"model": name, "iteration": None, **_accuracies(res), "tokens_mean": res.tokens_mean})
    steps = 0
    for it in iters:
        res = _result(data, it, EVALUATE.name, "student")
        if res is None:
            continue
        steps += _metrics(data, it, TRAIN.name).get("step", 0)
        rows.append({
            "model": "student (UNDO)" if int(it) > 0 else "student (distilled)",
            "iteration": int(it),
            **_accuracies(res),
            "train_rationales": _metrics(data, it, TRAIN.name).get("examples"),
            "errors_mined": _metrics(data, it, MINE.name).get("errors") if int(it) > 0 else None,
            "regenerated": _metrics(data, it, VERIFY.name).get("kept"),
            "teacher_unsolved": _metrics(data, it, VERIFY.name).get("problems_unsolved"),
            "student_steps": steps,
            "tokens_mean": res.tokens_mean,
        })
    for it in iters:
        res = _result(data, it, BASELINE_EVALUATE.name, "oneshot")
        if res:
            train = _metrics(data, it, BASELINE_TRAIN.name)
            rows.append({"model": "one-shot (same steps)", "iteration": int(it), **_accuracies(res),
                         "train_rationales": train.get("examples"), "student_steps": train.get("step"),
                         "tokens_mean": res.tokens_mean})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_cell(k, r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    students = [r for r in rows if r["model"].startswith("student (") and r["iteration"] is not None]
    ax.plot([r["iteration"] for r in students], [100 * r["accuracy"] for r in students], "o-", label="student (UNDO)")
    oneshot = [r for r in rows if r["model"].startswith("one-shot")]
    if oneshot:
        ax.plot([r["iteration"] for r in oneshot], [100 * r["accuracy"] for r in oneshot], "s", ms=9,
                label="one-shot, same steps")
    for r, style in zip([r for r in rows if r["iteration"] is None], ("--", ":"), strict=False):
        ax.axhline(100 * r["accuracy"], ls=style, color="gray", label=r["model"])
    ax.set_xlabel("iteration")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(-2, 105)
    if students:
        ax.set_xticks(range(max(r["iteration"] for r in students) + 1))
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cost_with_gains(data: dict[str, Any], models: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """`distill.cost.cost_rows`, each iteration's total with the accuracy it gained (points over
    the student before it: the untrained one for iteration 0 and for the one-shot baseline) per
    GPU-hour, or per CPU-hour where the run had no GPU. `models`: `build_rows(data)`, when the
    caller has it already."""
    baseline = {s.name for s in STAGES if s.plans == (BASELINE,)}
    rows, models = cost_rows(data, names(), baseline), models if models is not None else build_rows(data)
    base = next((m["accuracy"] for m in models if m["model"] == "student (untrained)"), None)
    student = {m["iteration"]: m["accuracy"] for m in models if m["model"].startswith("student (")}
    oneshot = {m["iteration"]: m["accuracy"] for m in models if m["model"].startswith("one-shot")}
    for row in rows:
        it = row["iteration"]
        if row["stage"] == "(iteration total)":
            after, before = student.get(it), student.get(it - 1, base)
        elif row["stage"] == "(one-shot baseline total)":
            after, before = oneshot.get(it), base
        else:
            continue
        hours, unit = (row["gpu_hours"], "GPU-h") if row["gpu_hours"] else (row["cpu_hours"], "CPU-h")
        if after is not None and before is not None and hours:
            row["gain_per_hour"] = f"{100 * (after - before) / hours:+.1f} points/{unit}"
    return rows


def cost_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| iter | stage | wall time | CPU-hours | GPU-hours | allocations | accuracy gained |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['iteration']} | {r['stage']} | {duration(r['wall_s'])} | {r['cpu_hours']:.3f} | "
              f"{r['gpu_hours']:.3f} | {r['allocations']} | {r.get('gain_per_hour', '-')} |" for r in rows]
    return "\n".join(lines)


def run_warnings(data: dict[str, Any]) -> list[str]:
    """What the stages warned about (e.g. few verified rationales), one line per iteration and stage."""
    out = []
    for it in sorted(data.get("iterations", {}), key=int):
        for name, entry in data["iterations"][it].get("stages", {}).items():
            warning = entry.get("metrics", {}).get("warning")
            if warning:
                out.append(f"iteration {it}, {name}: {warning}")
    return out


def write_report(run_dir: str | Path) -> tuple[Path, str]:
    """Write report.md, report.json and report.png into the run directory."""
    run_dir = Path(run_dir)
    report = RunPaths(run_dir).report
    manifest = Manifest(run_dir)
    if not manifest.path.exists():
        raise DistillError(f"{manifest.path}: no manifest (has this run started?)")
    data = manifest.read()
    rows = build_rows(data)
    if not rows:
        raise DistillError(f"{run_dir}: no finished evaluation to report yet")
    table = markdown_table(rows)
    name = data.get("run", run_dir.name)
    warnings = run_warnings(data)
    cost = cost_with_gains(data, rows)
    write_json(report.with_suffix(".json"), {"run": name, "config_hash": data.get("config_hash"), "rows": rows,
                                             "warnings": warnings, "cost": cost})
    plot(rows, report.with_suffix(".png"), f"{name}: held-out accuracy")
    write_evaluations(RunPaths(run_dir).root / "tensorboard", rows)
    notes = "".join(f"- {w}\n" for w in warnings)
    text = (f"# Report: {name}\n\nconfig `{data.get('config_hash')}`; accuracy on the held-out test split; "
            f"'student steps' counts optimizer steps across iterations.\n\n{table}\n\n"
            + (f"## Warnings\n\n{notes}\n" if notes else "")
            + (f"## Cost\n\nWall time is the time at least one of a stage's jobs ran (queue waits excluded); "
               f"CPU- and GPU-hours are what each allocation held times how long, every allocation of a requeued "
               f"unit included. Accuracy gained is the iteration's student over the one before it (the one-shot "
               f"baseline over the untrained student).\n\n{cost_table(cost)}\n\n" if cost else "")
            + f"![accuracy]({report.with_suffix('.png').name})\n")
    atomic_write_text(report, text)
    return report, table
