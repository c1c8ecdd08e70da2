"""Problem files (JSONL, JSON arrays, parquet, `datasets` directories) mapped onto
`{id, question, gold[, meta]}` records; named benchmarks are `distill.benchmarks`'.

`meta` (when present) holds per-problem attributes such as MATH's `subject` and `level`; it
travels with the problem into generation and graded records, so reports can group by it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from distill.errors import DataError
from distill.jsonl import iter_jsonl_numbered

T = TypeVar("T")

FORMATS = ("jsonl", "json", "parquet", "datasets")


def detect_format(path: Path, fmt: str = "auto") -> str:
    """The reader for `path`: the configured one, else by suffix (a directory is a dataset)."""
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "datasets"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".json":
        return "json"
    return "jsonl"


def _import_optional(module: str, what: str) -> Any:
    """Parquet and `datasets` readers need packages the lean CPU install leaves out."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = "datasets==5.2.0" if module == "datasets" else "pyarrow"
        raise DataError(f"{what}: reading this format needs the {module!r} package (pip install {package})") from None


def iter_rows(path: str | Path, fmt: str = "auto", split: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield `(place, record)` pairs; `place` names the file and line (or row) for errors."""
    path = Path(path)
    fmt = detect_format(path, fmt)
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if fmt == "jsonl":
        for lineno, rec in iter_jsonl_numbered(path):
            yield f"{path}:{lineno}", rec
    elif fmt == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: malformed JSON ({exc})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise DataError(f"{path}[{i}]: expected a JSON object, got {type(rec).__name__}")
            yield f"{path}[{i}]", rec
    elif fmt == "parquet":
        pq = _import_optional("pyarrow.parquet", str(path))
        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}[row {i}]", rec
    else:
        datasets = _import_optional("datasets", str(path))
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r} in this DatasetDict (has: {', '.join(ds)})")
            ds = ds[split]
        for i, rec in enumerate(ds):
            yield f"{path}[row {i}]", dict(rec)


def answer_text(value: Any) -> str:
    """Gold answers may be numbers (SVAMP's 27.0): an integral float is written as an integer."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def map_problem(
    rec: dict[str, Any], place: str, *, question: str, answer: str, id_field: str | None,
    meta_fields: list[str] | tuple[str, ...] = (), default_id: str,
) -> dict[str, Any]:
    """One record of a user file as a problem, with the configured field mapping."""
    for key in (question, answer, *meta_fields):
        if key not in rec:
            raise DataError(f"{place}: missing field {key!r}")
    problem = {
        "id": str(rec[id_field]) if id_field and rec.get(id_field) is not None else default_id,
        "question": str(rec[question]),
        "gold": answer_text(rec[answer]),
    }
    if meta_fields:
        problem["meta"] = {k: rec[k] for k in meta_fields}
    return problem


def check_unique(problems: list[dict[str, Any]], places: list[str]) -> None:
    seen: dict[str, str] = {}
    for problem, place in zip(problems, places, strict=True):
        if problem["id"] in seen:
            raise DataError(f"{place}: duplicate id {problem['id']!r} (first at {seen[problem['id']]})")
        seen[problem["id"]] = place


def iter_problems(
    source: str | Path, split: str, *, fmt: str = "auto", question: str = "question", answer: str = "answer",
    id_field: str | None = "id", meta_fields: list[str] | tuple[str, ...] = (),
) -> Iterator[tuple[str, dict[str, Any]]]:
    """`(place, problem)` for each record of a file, in file order; without an id field the id
    is `<split>-<row>`, the row counted over the whole file, so it does not depend on which
    problems a run leaves out."""
    for row, (place, rec) in enumerate(iter_rows(source, fmt, split)):
        yield place, map_problem(rec, place, question=question, answer=answer, id_field=id_field,
                                 meta_fields=meta_fields, default_id=f"{split}-{row:05d}")


def take(
    rows: Iterable[tuple[str, dict[str, Any]]], limit: int | None = None,
    drop: Callable[[str, dict[str, Any]], bool] | None = None,
) -> list[dict[str, Any]]:
    """The first `limit` problems of `rows` that `drop` (given each place and problem) does not
    leave out, with unique ids. Rows past the limit are not read."""
    problems: list[dict[str, Any]] = []
    places: list[str] = []
    for place, problem in rows:
        if drop is not None and drop(place, problem):
            continue
        problems.append(problem)
        places.append(place)
        if limit is not None and len(problems) >= limit:
            break
    check_unique(problems, places)
    return problems


def shard_slice(items: list[T], shard: int, num_shards: int) -> list[T]:
    """Contiguous, deterministic split: shard i of n always gets the same items."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} out of range for {num_shards} shards")
    n = len(items)
    return items[shard * n // num_shards : (shard + 1) * n // num_shards]
