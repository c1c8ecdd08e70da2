"""The training set of an iteration, D_it: what the train stage fits and the score stage scores.

Iteration 0's is its verified rationales; an UNDO iteration's adds the new rationales for the
mined errors to D_{it-1} (`undo.dataset`: accumulate or replace, `undo.cap_per_problem`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from distill.config import RunConfig
from distill.jsonl import read_jsonl
from distill.layout import RunPaths


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


def training_set(cfg: RunConfig, it: int) -> list[dict[str, Any]]:
    """D_it: iteration it's verified rationales combined with D_{it-1} (`undo.dataset`), in the
    order training and scoring both read it."""
    paths = RunPaths(cfg.run_dir)
    new = [{**r, "iteration": it} for r in read_jsonl(paths.verified(it))]
    old = read_jsonl(paths.train_data(it - 1)) if it > 0 else []
    return combine(new, old, cfg.undo.dataset, cfg.undo.cap_per_problem)
