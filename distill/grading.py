"""Final-answer extraction and equivalence grading for math responses.

Equivalence is decided by `math-verify`, which bounds each parse and each comparison with
`signal.alarm`. SIGALRM only works in a process's main thread, so batches are graded in a
process pool (each worker runs tasks in its own main thread) and never in threads.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from math_verify import parse, verify
from math_verify.errors import TimeoutException

from distill.errors import DataError
from distill.interrupts import sigint_deferred, sigint_ignored
from distill.jsonl import iter_jsonl_numbered, write_jsonl
from distill.progress import progress_bar

__all__ = ["extract_answer", "last_number", "gold_answer", "is_correct", "grade", "grade_records", "grade_file"]

# Below this many items a pool costs more (worker start-up, ~1 s) than it saves.
_MIN_ITEMS_FOR_POOL = 32

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_HASH_RE = re.compile(r"^[ \t]*####[ \t]*(.+?)[ \t]*$", re.MULTILINE)
_PHRASE_RE = re.compile(r"(?:final\s+answer(?:\s+is)?|the\s+answer\s+is)\s*[:：]?", re.IGNORECASE)
_INLINE_MATH_RE = re.compile(r"(?<!\\)\$\$?(.+?)(?<!\\)\$\$?")
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)|\s+I hope it is correct", re.IGNORECASE)
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _strip_answer(text: str) -> str | None:
    """Drop whitespace and unescaped `$` around an answer; `\\$` is a currency sign, kept."""
    text = text.strip()
    while text.startswith("$"):
        text = text[1:].lstrip()
    while text.endswith("$") and not text.endswith("\\$"):
        text = text[:-1].rstrip()
    return text or None


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at `start`, or None when it never closes (truncated)."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # `\{` and `\}` are literal braces, not grouping
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def _last_boxed(text: str) -> str | None:
    """The last complete `\\boxed{..}`/`\\fbox{..}`; an unclosed one (cut off mid-answer) is skipped."""
    for m in reversed(list(_BOX_RE.finditer(text))):
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            content = _braced(text, j)
            if content is not None:
                return content
        elif j > m.end():  # `\boxed 5`: TeX takes the next token
            token = re.match(r"[^\s$]+", text[j:])
            if token:
                return token.group(0)
    return None


def _after_phrase(text: str) -> str | None:
    """The answer after the last 'final answer'/'the answer is', up to the end of its sentence."""
    matches = list(_PHRASE_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].split("\n", 1)[0].strip()
    math = _INLINE_MATH_RE.search(rest)
    if math:
        return math.group(1)
    end = _SENTENCE_END_RE.search(rest)
    if end:
        rest = rest[: end.start()]
    return rest.strip().strip("*").strip()


def extract_answer(response: str) -> str | None:
    """The final answer of a model response, or None when it commits to none.

    Only text after the last `</think>` counts: boxed drafts inside the reasoning are not the
    answer. A response that opens `<think>` and never closes it ran out of tokens mid-thought,
    so it has no answer. Precedence follows how confident the marker is: `\\boxed{}` (last one),
    then a GSM8K `#### n` line, then a 'Final Answer:' / 'The answer is' phrase.
    """
    response = _final_part(response)
    if response is None:
        return None
    boxed = _last_boxed(response)
    if boxed is not None:
        return _strip_answer(boxed)
    hashes = _HASH_RE.findall(response)
    if hashes:
        return _strip_answer(hashes[-1])
    phrase = _after_phrase(response)
    if phrase is not None:
        return _strip_answer(phrase)
    return None


def _final_part(response: str) -> str | None:
    """The text an answer is looked for in: after the last `</think>`; None for a response that
    opens `<think>` and never closes it (it ran out of tokens mid-thought)."""
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1]
    return None if "<think>" in response else response


def last_number(response: str) -> str | None:
    """The flexible extraction (lm-eval's `flexible-extract`): the last number of the answer,
    thousands separators dropped, for a response that commits to no answer `extract_answer`
    finds."""
    text = _final_part(response)
    found = _NUMBER_RE.findall(text or "")
    return _strip_thousands(found[-1].rstrip(",")) if found else None


def _strip_thousands(text: str) -> str:
    """`1,234` -> `1234`, only for a whole plain number: `1,2` in MATH is a set of two answers."""
    return text.replace(",", "") if _THOUSANDS_RE.match(text) else text


def gold_answer(text: str) -> str:
    """Normalise a dataset's gold field to the bare answer that `is_correct` compares against."""
    hashes = _HASH_RE.findall(text)
    if hashes:
        return _strip_thousands(_strip_answer(hashes[-1]) or "")
    boxed = _last_boxed(text)
    if boxed is not None:
        return _strip_thousands(_strip_answer(boxed) or "")
    return _strip_thousands(text.strip())


def _parse(answer: str) -> list[Any]:
    """Parse a bare answer; math-verify only reads LaTeX inside a math environment.

    `\\boxed{}` suits every answer whose braces balance (ours do: they came out of a brace
    matcher); `$..$` is the fallback for the rest, and raw text for answers with their own `$`.
    """
    for wrapped in (f"\\boxed{{{answer}}}", f"${answer}$", answer):
        parsed = parse(wrapped)
        if parsed:
            return parsed
    return []


def is_correct(gold: str, pred: str | None) -> bool:
    """Whether `pred` is mathematically equivalent to `gold` (`1/2` == `0.5` == `\\frac{1}{2}`).

    Must run in a main thread (math-verify's SIGALRM timeouts); `grade` takes care of that.
    """
    if pred is None or not pred.strip() or not gold.strip():
        return False
    gold_parsed = _parse(gold)
    pred_parsed = _parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed))


def _grade_one(pair: tuple[str, str]) -> tuple[str | None, bool]:
    """Grade one item; any failure (including math-verify's BaseException timeout) is 'wrong'."""
    gold_text, response = pair
    pred: str | None = None
    try:
        pred = extract_answer(response)
        return pred, is_correct(gold_answer(gold_text), pred)
    except (Exception, TimeoutException):
        return pred, False


def default_workers() -> int:
    """CPUs this process may use: on a SLURM node that is the allocation, not the whole node."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _pool_context() -> multiprocessing.context.BaseContext:
    """Where workers come from: never a plain fork of the caller.

    The caller may hold threads (tqdm, torch, vLLM) whose locks a forked child would inherit
    mid-use. A fork server is a fresh single-threaded interpreter that imports this module
    once, then forks each worker ready to grade (a spawned worker pays ~0.7 s CPU importing
    sympy, per worker and per call). Windows has no fork server and gets spawn.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # Only speeds things up, and only if the server has not started yet: workers import
    # this module anyway when they unpickle `_grade_one`.
    ctx.set_forkserver_preload([__name__])
    # Ctrl-C reaches every process of the terminal's job. Started with SIGINT ignored, the
    # server and each worker it forks ignore it for good (no traceback of theirs, also while
    # the server imports); the caller stops the pool. A Ctrl-C in the few milliseconds the
    # start takes is lost.
    with sigint_ignored():
        multiprocessing.forkserver.ensure_running()
    return ctx


def grade(
    pairs: Sequence[tuple[str, str]],
    *,
    workers: int | None = None,
    progress: bool = True,
    chunksize: int = 16,
) -> list[tuple[str | None, bool]]:
    """Grade (gold_text, response) pairs, returning (pred_answer, correct) in input order.

    Sympy is CPU-bound and math-verify's timeouts need a main thread, so the work goes to
    processes, not threads; `workers=1` and small batches run in this process (main thread only).
    As with any spawn/forkserver pool, workers import the caller's `__main__`, so a script
    that calls this must guard its top level with `if __name__ == "__main__":`.
    """
    n = len(pairs)
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if chunksize < 1:
        raise ValueError(f"chunksize must be >= 1, got {chunksize}")
    workers = min(workers, max(1, -(-n // chunksize)))
    in_main_thread = threading.current_thread() is threading.main_thread()
    bar = progress_bar(total=n, desc="grading", unit="answer", disable=not progress)
    results: list[tuple[str | None, bool]] = []
    try:
        if in_main_thread and (workers == 1 or n < _MIN_ITEMS_FOR_POOL):
            for pair in pairs:
                results.append(_grade_one(pair))
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
                try:
                    with sigint_deferred():  # until every worker has started
                        graded = pool.map(_grade_one, pairs, chunksize=chunksize)
                    for result in graded:
                        results.append(result)
                        bar.update(1)
                except KeyboardInterrupt:  # the workers ignore it (see _pool_context): stop them here
                    pool.shutdown(cancel_futures=True)  # waits for the batches being graded, no more
                    raise
    finally:
        bar.close()
    return results


def _check_fields(record: dict[str, Any], gold_field: str, response_field: str) -> str | None:
    """Why a record cannot be graded, or None when it can."""
    for field in (gold_field, response_field):
        if field not in record:
            return f"missing field {field!r}"
    gold, response = record[gold_field], record[response_field]
    if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
        return f"field {gold_field!r} must be a string or number, got {type(gold).__name__}"
    if not isinstance(response, str):
        return f"field {response_field!r} must be a string, got {type(response).__name__}"
    return None


def grade_records(
    records: list[dict[str, Any]],
    *,
    gold_field: str = "gold",
    response_field: str = "response",
    **kw: Any,
) -> list[dict[str, Any]]:
    """Copies of `records` with `pred_answer` and `correct` added (the strict rule: a boxed answer,
    a `####` line or a 'The answer is' phrase) and `flexible_correct` (the same, or, where none
    of those is found, the last number of the answer); the inputs are left untouched.

    A numeric gold (SVAMP's `Answer` is a float) is graded as its text.
    """
    for i, record in enumerate(records):
        problem = _check_fields(record, gold_field, response_field)
        if problem:
            raise DataError(f"record {i}: {problem}")
    pairs = [(str(r[gold_field]), r[response_field]) for r in records]
    graded = grade(pairs, **kw)
    loose = {i: last_number(pairs[i][1]) for i, (pred, _) in enumerate(graded) if pred is None}
    loose = {i: number for i, number in loose.items() if number is not None}
    flexible = dict(zip(loose, grade([(pairs[i][0], f"\\boxed{{{n}}}") for i, n in loose.items()], **kw),
                        strict=True)) if loose else {}
    return [
        {**record, "pred_answer": pred, "correct": correct,
         "flexible_correct": correct or (i in flexible and flexible[i][1])}
        for i, (record, (pred, correct)) in enumerate(zip(records, graded, strict=True))
    ]


def grade_file(
    input_path: str | Path,
    output_path: str | Path,
    *,
    gold_field: str = "gold",
    response_field: str = "response",
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Grade a JSONL of records into a new JSONL (written atomically) and return the score.

    Every record is checked before any grading starts, so a bad line fails in a second, not
    after an hour of sympy. An empty input scores accuracy 0.0 (JSON has no NaN).
    """
    input_path = Path(input_path)
    records = []
    for lineno, record in iter_jsonl_numbered(input_path):
        problem = _check_fields(record, gold_field, response_field)
        if problem:
            raise DataError(f"{input_path}:{lineno}: {problem}")
        records.append(record)
    graded = grade_records(
        records, gold_field=gold_field, response_field=response_field, workers=workers, progress=progress
    )
    write_jsonl(output_path, graded)
    n = len(graded)
    correct = sum(1 for r in graded if r["correct"])
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0}
