"""Problem sets: JSONL files mapped onto `{id, question, gold}` records."""

from __future__ import annotations

from typing import Any, TypeVar

from distill.config import DataConfig
from distill.errors import DataError
from distill.jsonl import iter_jsonl_numbered

T = TypeVar("T")


def load_problems(data: DataConfig, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The problems of a split, in file order; ids are stable across runs (field or position)."""
    path = getattr(data, split)
    if path is None:
        raise DataError(f"data.{split}: no file configured for this split")
    problems: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for lineno, rec in iter_jsonl_numbered(path):
        for key in (data.question_field, data.answer_field):
            if key not in rec:
                raise DataError(f"{path}:{lineno}: missing field {key!r}")
        pid = str(rec[data.id_field]) if data.id_field and data.id_field in rec else f"{split}-{len(problems):05d}"
        if pid in seen:
            raise DataError(f"{path}:{lineno}: duplicate id {pid!r} (first on line {seen[pid]})")
        seen[pid] = lineno
        problems.append({"id": pid, "question": str(rec[data.question_field]), "gold": str(rec[data.answer_field])})
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise DataError(f"{path}: no problems in file")
    return problems


def shard_slice(items: list[T], shard: int, num_shards: int) -> list[T]:
    """Contiguous, deterministic split: shard i of n always gets the same items."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} out of range for {num_shards} shards")
    n = len(items)
    return items[shard * n // num_shards : (shard + 1) * n // num_shards]
