"""Named benchmarks: the files in data/benchmarks/ and how each maps onto problem records.

A benchmark split is named `<name>:<split>` (`gsm8k:train`, `gsm8k:test`, `math500:test`,
`svamp:test`); a bare `<name>` means its test split. Each adapter knows its file's fields, so
a config or the eval CLI only names the benchmark. Metadata a report groups by (MATH's
`subject` and `level`, SVAMP's `type`) is kept under the problem's `meta`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.data import answer_text, iter_rows, take
from distill.errors import DataError

BENCH_DIR = Path(__file__).resolve().parents[1] / "data" / "benchmarks"


@dataclass(frozen=True)
class BenchmarkSplit:
    """One file of a benchmark and the function that turns its records into problems."""

    file: str
    to_problem: Callable[[dict[str, Any], int], dict[str, Any]]
    size: int

    @property
    def path(self) -> Path:
        return BENCH_DIR / self.file


def _gsm8k(split: str) -> Callable[[dict[str, Any], int], dict[str, Any]]:
    # The gold is the whole rationale: grading reads its `#### n` line, and verified gold
    # rationales can serve as training targets.
    return lambda rec, i: {"id": f"gsm8k-{split}-{i:05d}", "question": rec["question"], "gold": rec["answer"]}


def _math500(rec: dict[str, Any], i: int) -> dict[str, Any]:
    return {"id": rec["unique_id"], "question": rec["problem"], "gold": rec["answer"],
            "meta": {"subject": rec["subject"], "level": rec["level"]}}


def _svamp(rec: dict[str, Any], i: int) -> dict[str, Any]:
    # Body + " " + Question, as the usual SVAMP evaluations (MAmmoTH, ToRA) join them.
    return {"id": rec["ID"], "question": f"{rec['Body'].strip()} {rec['Question'].strip()}",
            "gold": answer_text(rec["Answer"]), "meta": {"type": rec["Type"]}}


BENCHMARKS: dict[str, dict[str, BenchmarkSplit]] = {
    "gsm8k": {
        "train": BenchmarkSplit("gsm8k_train.jsonl", _gsm8k("train"), 7473),
        "test": BenchmarkSplit("gsm8k_test.jsonl", _gsm8k("test"), 1319),
    },
    "math500": {"test": BenchmarkSplit("math500_test.jsonl", _math500, 500)},
    "svamp": {"test": BenchmarkSplit("svamp.json", _svamp, 1000)},
}


def split_names() -> list[str]:
    return [f"{name}:{split}" for name, splits in BENCHMARKS.items() for split in splits]


def find_benchmark(ref: str) -> BenchmarkSplit | None:
    """The split a name refers to (`gsm8k`, `gsm8k:train`), or None when it is not a benchmark."""
    name, _, split = ref.partition(":")
    return BENCHMARKS.get(name, {}).get(split or "test")


def iter_benchmark(ref: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """`(place, problem)` for each record of a benchmark split, in file order."""
    bench = find_benchmark(ref)
    if bench is None:
        raise DataError(f"{ref}: unknown benchmark (known: {', '.join(split_names())})")
    for i, (place, rec) in enumerate(iter_rows(bench.path)):
        try:
            yield place, bench.to_problem(rec, i)
        except KeyError as exc:
            raise DataError(f"{place}: missing field {exc.args[0]!r}") from None


def load_benchmark(ref: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The first `limit` problems of a benchmark split, in file order."""
    return take(iter_benchmark(ref), limit)
