"""Token efficiency: accuracy and response length per model, per problem group, and the
`<= median tokens` filter on verified rationales.

Everything here reads graded records (`correct`, `n_tokens`, optional `meta`), so the same
report serves a standalone benchmark evaluation and a pipeline run's eval outputs, and every
number in it can be recomputed from the graded JSONL it came from.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from distill.jsonl import atomic_write_text, write_json

FILTERS = ("none", "median_tokens", "problem_median_tokens")


# -- the training-set filter -------------------------------------------------------------------


def filter_rationales(records: list[dict[str, Any]], how: str) -> tuple[list[dict[str, Any]], float | None]:
    """Verified rationales kept by the filter `how`, in input order, and the global threshold.

    `median_tokens`: at most the median length of all verified rationales (a problem whose
    rationales are all long loses them). `problem_median_tokens`: at most the median of that
    problem's verified rationales, so every solved problem keeps at least one. The median of
    an even count is the mean of the middle two, so ties at the threshold are kept.
    """
    if how == "none" or not records:
        return list(records), None
    if how == "median_tokens":
        threshold = float(statistics.median(r["n_tokens"] for r in records))
        return [r for r in records if r["n_tokens"] <= threshold], threshold
    if how == "problem_median_tokens":
        by_problem: dict[str, list[int]] = defaultdict(list)
        for r in records:
            by_problem[r["problem_id"]].append(r["n_tokens"])
        medians = {pid: statistics.median(counts) for pid, counts in by_problem.items()}
        return [r for r in records if r["n_tokens"] <= medians[r["problem_id"]]], None
    raise ValueError(f"unknown filter {how!r} (expected one of {', '.join(FILTERS)})")


# -- summaries ---------------------------------------------------------------------------------


def length_stats(counts: list[int], prefix: str = "tokens") -> dict[str, float | None]:
    """Mean, median and max of token counts; None (JSON null, shown as "-") when there are none,
    e.g. the correct answers of a model that got nothing right."""
    if not counts:
        return {f"{prefix}_mean": None, f"{prefix}_median": None, f"{prefix}_max": None}
    return {
        f"{prefix}_mean": round(statistics.fmean(counts), 2),
        f"{prefix}_median": float(statistics.median(counts)),
        f"{prefix}_max": max(counts),
    }


def _sort_key(value: str) -> tuple[int, float | str]:
    """Levels sort as numbers (2 before 10), names alphabetically."""
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def group_stats(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """field -> value -> {n, correct, accuracy, tokens_mean}, for every field in `meta`."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        for key, value in (r.get("meta") or {}).items():
            groups[key][str(value)].append(r)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key in sorted(groups):
        out[key] = {}
        for value in sorted(groups[key], key=_sort_key):
            rs = groups[key][value]
            correct = sum(1 for r in rs if r["correct"])
            out[key][value] = {"n": len(rs), "correct": correct, "accuracy": round(correct / len(rs), 4),
                               "tokens_mean": length_stats([r["n_tokens"] for r in rs])["tokens_mean"]}
    return out


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, response lengths (all, correct, incorrect) and the per-group breakdown."""
    correct = [r["n_tokens"] for r in records if r["correct"]]
    wrong = [r["n_tokens"] for r in records if not r["correct"]]
    flexible = sum(1 for r in records if r.get("flexible_correct", r["correct"]))
    return {
        "n": len(records),
        "correct": len(correct),
        "accuracy": round(len(correct) / len(records), 4) if records else 0.0,
        # The last number counted where no boxed answer, `####` line or answer phrase is found.
        "flexible_accuracy": round(flexible / len(records), 4) if records else 0.0,
        "unfinished": sum(1 for r in records if not r.get("finished", True)),
        **length_stats([r["n_tokens"] for r in records]),
        **length_stats(correct, "correct_tokens"),
        **length_stats(wrong, "incorrect_tokens"),
        "by": group_stats(records),
    }


# -- the report --------------------------------------------------------------------------------

COLUMNS = [
    ("model", "model"), ("n", "n"), ("accuracy", "accuracy"), ("flexible_accuracy", "flexible accuracy"),
    ("tokens_mean", "mean tokens"),
    ("tokens_median", "median tokens"), ("tokens_max", "max tokens"),
    ("correct_tokens_mean", "mean tokens (correct)"), ("incorrect_tokens_mean", "mean tokens (incorrect)"),
    ("unfinished", "hit max tokens"),
]


def table_cell(key: str, value: Any) -> str:
    """A markdown table cell: '-' for nothing, accuracy as a percentage, floats to one decimal."""
    if value is None:
        return "-"
    if key in ("accuracy", "flexible_accuracy"):
        return f"{100 * value:.1f}%"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def comparison_table(summaries: dict[str, dict[str, Any]]) -> str:
    """One row per model: the before/after table (teacher, base student, distilled student)."""
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for label, s in summaries.items():
        lines.append("| " + " | ".join(table_cell(k, label if k == "model" else s.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def group_tables(summaries: dict[str, dict[str, Any]]) -> str:
    """Accuracy by metadata field (MATH subject and level, SVAMP type), models side by side."""
    fields = sorted({f for s in summaries.values() for f in s["by"]})
    out = []
    labels = list(summaries)
    for f in fields:
        values = sorted({v for s in summaries.values() for v in s["by"].get(f, {})}, key=_sort_key)
        lines = [f"### by {f}", "", "| " + " | ".join([f, "n", *(f"{lb} acc" for lb in labels)]) + " |",
                 "|" + "---|" * (2 + len(labels))]
        for v in values:
            cells = [summaries[lb]["by"].get(f, {}).get(v) for lb in labels]
            n = next((c["n"] for c in cells if c), 0)
            shown = (f"{100 * c['accuracy']:.1f}%" if c else "-" for c in cells)
            lines.append("| " + " | ".join([v, str(n), *shown]) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def plot_token_histograms(records_by_label: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Response token counts per model, correct and incorrect overlaid, on shared bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(records_by_label)
    counts = [r["n_tokens"] for rs in records_by_label.values() for r in rs] or [0]
    hi = max(counts)
    bins = list(range(0, hi + max(1, hi // 30) + 1, max(1, hi // 30)))
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.4), squeeze=False, sharey=True)
    for ax, label in zip(axes[0], labels, strict=True):
        rs = records_by_label[label]
        ok = [r["n_tokens"] for r in rs if r["correct"]]
        bad = [r["n_tokens"] for r in rs if not r["correct"]]
        ax.hist(bad, bins=bins, alpha=0.6, color="tab:red", label=f"incorrect ({len(bad)})")
        ax.hist(ok, bins=bins, alpha=0.6, color="tab:green", label=f"correct ({len(ok)})")
        acc = 100 * len(ok) / len(rs) if rs else 0.0
        ax.set_title(f"{label}: {acc:.1f}% correct", fontsize=10)
        ax.set_xlabel("response tokens")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("responses")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_token_report(
    records_by_label: dict[str, list[dict[str, Any]]], out_dir: Path, title: str, extra: dict[str, Any] | None = None,
) -> tuple[Path, str]:
    """`tokens.md`, `tokens.json` and `tokens.png` in `out_dir`; returns the .md path and the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = {label: summarize(rs) for label, rs in records_by_label.items()}
    table = comparison_table(summaries)
    groups = group_tables(summaries)
    plot_token_histograms(records_by_label, out_dir / "tokens.png", title)
    write_json(out_dir / "tokens.json", {"title": title, **(extra or {}), "models": summaries})
    text = (f"# {title}\n\nGreedy responses, graded with math-verify; tokens are generated tokens "
            f"(end-of-sequence included).\n\n{table}\n\n{groups + chr(10) * 2 if groups else ''}"
            f"![response tokens, correct vs incorrect](tokens.png)\n")
    atomic_write_text(out_dir / "tokens.md", text)
    return out_dir / "tokens.md", table
