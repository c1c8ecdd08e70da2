"""JSONL reading and writing with the two guarantees the pipeline relies on.

Reads name the file and line of a malformed record. Writes either append whole lines and
flush them to disk (shards that resume) or replace the whole file atomically (merged outputs).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from distill.errors import DataError, writing


def iter_jsonl_numbered(
    path: str | Path, *, allow_partial_tail: bool = False
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line number, record)` pairs of a JSONL file.

    `allow_partial_tail` drops a last line without its newline: that is what a process killed
    mid-write leaves behind in a shard it owns, and resuming must redo that record, not fail.
    """
    path = Path(path)
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found", path) from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n") and allow_partial_tail:
                return
            text = raw.strip()
            if not text:
                continue
            try:
                record = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                if not raw.endswith(b"\n"):
                    raise DataError(f"{path}:{lineno}: last line cut short mid-record (an interrupted write?)",
                                    path) from None
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc})", path) from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}", path)
            yield lineno, record


def iter_jsonl(path: str | Path, *, allow_partial_tail: bool = False) -> Iterator[dict[str, Any]]:
    for _, record in iter_jsonl_numbered(path, allow_partial_tail=allow_partial_tail):
        yield record


def read_jsonl(path: str | Path, *, allow_partial_tail: bool = False) -> list[dict[str, Any]]:
    return list(iter_jsonl(path, allow_partial_tail=allow_partial_tail))


def truncate_partial_tail(path: Path) -> int:
    """Cut a trailing incomplete line off a file we append to; return the bytes removed."""
    if not path.exists():
        return 0
    with path.open("rb+") as fh:
        data = fh.read()
        keep = data.rfind(b"\n") + 1
        if keep == len(data):
            return 0
        fh.truncate(keep)
        return len(data) - keep


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records as whole lines in one write, then fsync, so a batch is durable."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not payload:
        return
    with writing(path), path.open("a", encoding="utf-8") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so readers see either the old or the new content, never a mix."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
