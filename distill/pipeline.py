"""The stages of distill in pipeline order, and the plans made of them.

Iteration 0 distils from the training problems (generate, verify, train, evaluate). Iteration
N >= 1 is an UNDO step: the student of N-1 is probed (mine), its errors go back to the teacher
with an error-conditioned prompt, the verified new rationales join the training set and the
student is retrained. The one-shot baseline trains a student on iteration 0's data at the same
compute and evaluates it. Each plan is the registered stages that take part in it, in this
order; a new stage is one `register` call and runs everywhere the others do.
"""

from __future__ import annotations

from typing import Any

from distill.config import RunConfig
from distill.errors import DistillError
from distill.evaluation import BASELINE_EVALUATE, EVALUATE
from distill.mining import MINE
from distill.rationales import GENERATE, VERIFY
from distill.records import StageRecord
from distill.scoring import SCORE
from distill.stage import BASELINE, FIRST, UNDO, Stage
from distill.student import BASELINE_TRAIN, TRAIN
from distill.typed_yaml import check_name

STAGES: list[Stage] = [MINE, GENERATE, VERIFY, SCORE, TRAIN, EVALUATE, BASELINE_TRAIN, BASELINE_EVALUATE]


def register(stage: Stage, *, after: str | None = None) -> Stage:
    """Add a stage after another one (at the end when `after` is None); registering a stage of
    the same name again replaces it in place."""
    check_name(stage.name, "stage name")
    names = [s.name for s in STAGES]
    if stage.name in names:
        STAGES[names.index(stage.name)] = stage
        return stage
    STAGES.insert(names.index(after) + 1 if after is not None else len(STAGES), stage)
    return stage


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise DistillError(f"unknown stage {name!r} (known: {', '.join(s.name for s in STAGES)})")


def names() -> list[str]:
    return [s.name for s in STAGES]


def plan(kind: str) -> list[Stage]:
    return [s for s in STAGES if kind in s.plans]


def iteration_plan(it: int, cfg: RunConfig | None = None) -> list[Stage]:
    """Iteration it's stages; with a config, only those its iterations have (`Stage.needed`)."""
    return [s for s in plan(FIRST if it == 0 else UNDO) if cfg is None or s.needed(cfg, it)]


def baseline_plan() -> list[Stage]:
    return plan(BASELINE)


def kind_plan(kind: str, cfg: RunConfig) -> list[Stage]:
    """A plan's stages that a config's iterations have (iteration 1 standing for UNDO's)."""
    return [s for s in plan(kind) if s.needed(cfg, 0 if kind == FIRST else 1)]


def plan_lines(cfg: RunConfig) -> list[str]:
    """Each plan's stages in order, as `distill plan` shows them for a config, with the
    cluster-profile section whose resources a stage's jobs get where it is not the stage's own name."""
    def shown(s: Stage) -> str:
        return s.name if s.resource_section == s.name else f"{s.name} ({s.resource_section})"
    return [f"{label}: {', '.join(shown(s) for s in kind_plan(kind, cfg))}"
            for label, kind in (("iteration 0", FIRST), ("iteration 1+ (UNDO)", UNDO), ("baseline", BASELINE))]


def require_finished(manifest: dict[str, Any], cfg: RunConfig, it: int, again: str) -> None:
    """Refuse to start after iteration `it` before it is finished: its student and its data are
    what the next iteration starts from. `again` is the command that finishes it."""
    for s in iteration_plan(it, cfg):
        state = StageRecord.of(manifest, it, s.name).state
        if state != "done":
            raise DistillError(f"{cfg.name}: iteration {it + 1} needs iteration {it} finished, but its {s.name} stage "
                               f"is {state}: run `{again}` first")


def distributed_sections() -> list[str]:
    """The cluster-profile sections of the stages that may run as several torchrun ranks."""
    return [s for s in resource_sections() if any(t.distributed for t in STAGES if t.resource_section == s)]


def resource_sections() -> list[str]:
    """The cluster-profile sections the stages' jobs draw their resources from, in order."""
    out: list[str] = []
    for s in STAGES:
        if s.resource_section not in out:
            out.append(s.resource_section)
    return out
