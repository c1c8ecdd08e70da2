"""Typed views of what a stage records in the manifest.

The manifest on disk stays plain JSON (old runs stay readable, `manifest.json` stays greppable);
code that reads an entry goes through these views instead of spelling its keys, so a field's
name and meaning live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distill.manifest import stage_entry


@dataclass(frozen=True)
class ArtifactRecord:
    """A file or directory a stage recorded: its path relative to the run and its sha256."""

    path: str
    sha256: str


@dataclass(frozen=True)
class ModelResult:
    """One model's evaluation on the held-out split (`distill.efficiency.summarize`)."""

    accuracy: float
    tokens_mean: float
    # The last number counted where the strict rule finds no answer; None in runs graded before it.
    flexible_accuracy: float | None = None
    # The rest as recorded: n, correct, unfinished, token statistics, the per-group breakdown.
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, raw: dict[str, Any]) -> ModelResult:
        main = ("accuracy", "tokens_mean", "flexible_accuracy")
        return cls(raw["accuracy"], raw["tokens_mean"], raw.get("flexible_accuracy"),
                   {k: v for k, v in raw.items() if k not in main})


@dataclass(frozen=True)
class StageRecord:
    """A stage's entry for one iteration: its state, metrics, artifacts and, for an evaluation,
    each model's result. An entry never written reads as pending and empty."""

    state: str
    metrics: dict[str, Any]
    artifacts: dict[str, ArtifactRecord]
    results: dict[str, ModelResult]

    @classmethod
    def of(cls, manifest: dict[str, Any], iteration: int | str, stage: str) -> StageRecord:
        entry = stage_entry(manifest, int(iteration), stage)
        return cls(entry.get("state", "pending"), entry.get("metrics", {}),
                   {k: ArtifactRecord(**v) for k, v in entry.get("artifacts", {}).items()},
                   {k: ModelResult.of(v) for k, v in entry.get("results", {}).items()})

    @property
    def done(self) -> bool:
        return self.state == "done"

    def result(self, label: str) -> ModelResult | None:
        """Model `label`'s result once the stage is done (a half-merged entry counts for nothing)."""
        return self.results.get(label) if self.done else None
