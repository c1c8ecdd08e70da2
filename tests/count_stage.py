"""A stage defined outside distill (tests/test_stages.py registers it): it counts the verified
rationales of an iteration. Everything a stage needs is here; no other file names it."""

from __future__ import annotations

from distill.jsonl import read_jsonl
from distill.stage import FIRST, UNDO, Result, Stage, Unit


def count_verified(unit: Unit) -> Result:
    """Count the verified rationales of the iteration."""
    return Result({"metrics": {"verified": len(read_jsonl(unit.paths.verified(unit.iteration)))}})


COUNT = Stage("count_verified", count_verified, plans=(FIRST, UNDO), resources="verify",
              summary=lambda entry: f"{entry['metrics']['verified']} verified rationales")
