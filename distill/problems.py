"""The problem sets of a run: a split is a named benchmark or a file, and a run reads its
training problems, its held-out split and its UNDO probe split from them.

Every split that feeds a model goes through `problem_set`, which applies `data.max_question_chars`:
with `data.too_long: skip` each job leaves out the same problems, so shards slice the same list
everywhere; with `refuse` the first job to read the split (the driver's start-up checks) fails.
The training and probe splits leave out near-copies of evaluated problems with
`data.decontaminate: drop` (`distill.decontamination`), the same way in every job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distill.benchmarks import find_benchmark, iter_benchmark
from distill.config import DataConfig, RunConfig
from distill.data import iter_problems, take
from distill.decontamination import Overlap, overlap
from distill.errors import DataError


@dataclass
class ProblemSet:
    """The problems of a split, and where the questions over `data.max_question_chars` are."""

    problems: list[dict[str, Any]]
    too_long: list[str] = field(default_factory=list)


def problem_set(data: DataConfig, split: str, limit: int | None = None) -> ProblemSet:
    """The first `limit` problems of a split, in source order; ids are stable across runs (field
    or position). A question longer than `data.max_question_chars` is refused, or with
    `data.too_long: skip` left out (the limit then counts the problems kept)."""
    source = getattr(data, split)
    if source is None:
        raise DataError(f"data.{split}: no file configured for this split")
    rows = iter_benchmark(source) if find_benchmark(source) else iter_problems(
        source, split, fmt=data.format, question=data.question_field, answer=data.answer_field,
        id_field=data.id_field, meta_fields=data.meta_fields)
    too_long: list[str] = []

    def over(place: str, problem: dict[str, Any]) -> bool:
        if len(problem["question"]) <= data.max_question_chars:
            return False
        too_long.append(place)
        return data.too_long == "skip"

    problems = take(rows, limit, over)
    if too_long and data.too_long == "refuse":
        raise DataError(f"{too_long[0]}: question longer than data.max_question_chars ({data.max_question_chars} "
                        f"characters), {len(too_long)} such in data.{split}; raise data.max_question_chars or set "
                        "data.too_long: skip to leave them out")
    if not problems:
        why = f" (all {len(too_long)} longer than data.max_question_chars)" if too_long else ""
        raise DataError(f"{source}: no problems in file{why}")
    return ProblemSet(problems, too_long)


def load_problems(data: DataConfig, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The problems of a split that a model is given (see `problem_set`)."""
    return problem_set(data, split, limit).problems


def skipped_note(data: DataConfig, split: str, found: ProblemSet) -> str:
    """One line for the driver's output when `data.too_long: skip` left problems out."""
    if not found.too_long:
        return ""
    return (f"data.{split}: left out {len(found.too_long)} problem(s) whose question is longer than "
            f"data.max_question_chars ({data.max_question_chars} characters), the first at {found.too_long[0]}")


def train_problems(cfg: RunConfig) -> list[dict[str, Any]]:
    return without_copies(cfg, "train", load_problems(cfg.data, "train", cfg.data.train_limit))


def eval_problems(cfg: RunConfig) -> list[dict[str, Any]]:
    return load_problems(cfg.data, cfg.eval.split, cfg.eval.limit)


def probe_problems(cfg: RunConfig) -> list[dict[str, Any]]:
    return without_copies(cfg, cfg.undo.probe_split, load_problems(cfg.data, cfg.undo.probe_split,
                                                                   cfg.undo.probe_limit))


def split_overlap(cfg: RunConfig, split: str) -> Overlap | None:
    """What a split that feeds training shares with the evaluated problems (None: it is them)."""
    if split == cfg.eval.split:
        return None
    limit = cfg.data.train_limit if split == "train" else cfg.undo.probe_limit
    return overlap(load_problems(cfg.data, split, limit), eval_problems(cfg), cfg.data.decontaminate_share)


def without_copies(cfg: RunConfig, split: str, problems: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """With `data.decontaminate: drop`, the problems less the near-copies of evaluated ones (the
    limit counts the problems before they are left out)."""
    if cfg.data.decontaminate != "drop" or split == cfg.eval.split:
        return problems
    copies = overlap(problems, eval_problems(cfg), cfg.data.decontaminate_share).copies
    return [p for p in problems if str(p["id"]) not in copies]
