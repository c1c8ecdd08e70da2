"""Problem files (JSONL, JSON arrays, parquet, `datasets` directories) mapped onto
`{id, question, gold[, meta]}` records; named benchmarks are `distill.benchmarks`'.

`meta` (when present) holds per-problem attributes such as MATH's `subject` and `level`; it
travels with the problem into generation and graded records, so reports can group by it.
A question or gold that is not text, or a gold from which grading could read no final answer,
is refused naming its file, line and field (`field_text`, `gold_text`).
"""

from __future__ import annotations

import json
import math
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


# An error line quotes at most this much of a value: a 5 MB field must not flood a terminal or log.
QUOTE_CHARS = 80
# The longest gold without a `#### n` line or `\boxed{..}` that is taken as a plain answer. The
# longest MATH-500 answer is 53 characters; every GSM8K rationale spans several lines.
PLAIN_ANSWER_CHARS = 100


def quoted(value: Any, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)` for an error line, cut after `limit` characters with its full length said."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str) else len(text)
    return f"{text[:limit]}… ({size} characters)"


def answer_text(value: Any) -> str:
    """Gold answers may be numbers (SVAMP's 27.0): an integral float is written as an integer."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _kind(value: Any) -> str:
    """A value's type as a JSON file spells it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    names = {list: "a list", tuple: "a list", dict: "an object"}
    return f"{names.get(type(value), type(value).__name__)} {quoted(value)}"


def field_text(value: Any, place: str, key: str) -> str:
    """A question or gold answer as text. Only a non-empty string or a finite number is one:
    `str()` would turn null, a list or an object into "None" or "['7']", which a model would
    be asked or graded against without any error."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{place}: field {key!r}: expected a non-empty string or a number, got {_kind(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{place}: field {key!r}: expected a finite number, got {value}")
    text = answer_text(value)
    if not text.strip():
        raise DataError(f"{place}: field {key!r} is empty")
    return text


def is_plain_answer(text: str) -> bool:
    """Whether a gold without a final-answer marker can be the answer itself: one line of at
    most `PLAIN_ANSWER_CHARS` characters."""
    text = text.strip()
    return "\n" not in text and len(text) <= PLAIN_ANSWER_CHARS


def marked_answer(text: str) -> str | None:
    """The final answer grading reads from a `#### n` line or `\\boxed{..}` in `text`, or None
    when it finds no such marker (`gold_answer` then takes the whole text)."""
    if "####" not in text and "\\boxed" not in text and "\\fbox" not in text:
        return None  # the common case, without importing math-verify
    from distill.grading import gold_answer

    answer = gold_answer(text)
    return None if answer == text.strip() else answer


def gold_text(value: Any, place: str, key: str) -> str:
    """The gold answer of a record, refused where grading could not read a final answer from it.

    Grading (`distill.grading.gold_answer`) compares against the last `#### n` line (GSM8K
    rationales), else the last `\\boxed{..}` (MATH solutions), else the whole text. So a gold is
    accepted when it is a number, carries one of those markers with something in it, or is a
    plain answer (`is_plain_answer`). Anything else is a worked solution without a findable
    final answer: graded as a whole it would match no response, and the run would report 0%
    without any error. The rule reads the value, whatever field `data.answer_field` names, so
    a data set with both a solution and a short answer works by pointing it at the answer.
    """
    text = field_text(value, place, key)
    if not isinstance(value, str):
        return text
    answer = marked_answer(text)
    if answer is not None and not answer.strip():
        raise DataError(f"{place}: field {key!r}: its final answer is empty: {quoted(value)}")
    if answer is None and not is_plain_answer(text):
        raise DataError(f"{place}: field {key!r}: no final answer to grade against (neither a '#### n' line nor "
                        f"\\boxed{{...}}, and not a plain answer of one line up to {PLAIN_ANSWER_CHARS} characters): "
                        f"{quoted(value)}; set data.answer_field to a field holding the bare answer")
    return text


def map_problem(
    rec: dict[str, Any], place: str, *, question: str, answer: str, id_field: str | None,
    meta_fields: list[str] | tuple[str, ...] = (), default_id: str,
) -> dict[str, Any]:
    """One record of a user file as a problem, with the configured field mapping; the question
    and gold are checked as `field_text` and `gold_text` say."""
    for key in (question, answer, *meta_fields):
        if key not in rec:
            raise DataError(f"{place}: missing field {key!r}")
    problem = {
        "id": str(rec[id_field]) if id_field and rec.get(id_field) is not None else default_id,
        "question": field_text(rec[question], place, question),
        "gold": gold_text(rec[answer], place, answer),
    }
    if meta_fields:
        problem["meta"] = {k: rec[k] for k in meta_fields}
    return problem


def check_unique(problems: list[dict[str, Any]], places: list[str]) -> None:
    seen: dict[str, str] = {}
    for problem, place in zip(problems, places, strict=True):
        if problem["id"] in seen:
            raise DataError(f"{place}: duplicate id {quoted(problem['id'])} (first at {seen[problem['id']]})")
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
