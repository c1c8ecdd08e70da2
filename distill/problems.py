"""The problem sets of a run: a split is a named benchmark or a file, and a run reads its
training problems, its held-out split and its UNDO probe split from them."""

from __future__ import annotations

from typing import Any

from distill.benchmarks import find_benchmark, load_benchmark
from distill.config import DataConfig, RunConfig
from distill.data import read_problems
from distill.errors import DataError


def load_problems(data: DataConfig, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The problems of a split, in source order; ids are stable across runs (field or position)."""
    source = getattr(data, split)
    if source is None:
        raise DataError(f"data.{split}: no file configured for this split")
    if find_benchmark(source):
        return load_benchmark(source, limit)
    return read_problems(source, split, fmt=data.format, question=data.question_field, answer=data.answer_field,
                         id_field=data.id_field, meta_fields=data.meta_fields, limit=limit)


def train_problems(cfg: RunConfig) -> list[dict[str, Any]]:
    return load_problems(cfg.data, "train", cfg.data.train_limit)


def eval_problems(cfg: RunConfig) -> list[dict[str, Any]]:
    return load_problems(cfg.data, cfg.eval.split, cfg.eval.limit)


def probe_problems(cfg: RunConfig) -> list[dict[str, Any]]:
    return load_problems(cfg.data, cfg.undo.probe_split, cfg.undo.probe_limit)
