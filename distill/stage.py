"""What a stage is: a named step of an iteration, cut into units that run as separate jobs.

A `Stage` says which units an iteration has (one, or one per shard), how one unit runs, which
recorded artifacts of earlier stages it reads, how the units' outputs merge once all are done,
what a unit's job needs (the cluster profile section that holds its resources) and in which
plans it takes part. The stages themselves are defined beside their work (`distill.rationales`,
`distill.student`, `distill.evaluation`, ...) and listed in pipeline order by `distill.pipeline`;
the driver, the submitit jobs and the sbatch scripts run them through `distill.runner` without
knowing any of them by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from distill.config import RunConfig
from distill.errors import DataError, DistillError
from distill.integrity import Input, identity
from distill.layout import RunPaths

T = TypeVar("T")

# Plans: which stages make up a first iteration, a later (UNDO) iteration, the one-shot baseline.
FIRST, UNDO, BASELINE = "first", "undo", "baseline"


class Stopped(BaseException):
    """Raised inside a unit by a stop signal, in stages that may stop anywhere (their work on
    disk stays consistent whatever line is interrupted). A BaseException, like
    KeyboardInterrupt, so no `except Exception` on the way swallows it."""


class RedoUnit(DistillError):
    """A merge found units' output damaged or cut short after they ended: those units run again."""

    def __init__(self, message: str, keys: list[str]) -> None:
        super().__init__(message)
        self.keys = keys


@dataclass
class Unit:
    """One unit of work handed to a stage's `run`: where, and how to know it should stop."""

    cfg: RunConfig
    iteration: int
    key: str
    paths: RunPaths
    should_stop: Callable[[], bool] = lambda: False
    progress: bool = True
    # The run's manifest as it was when the unit started (read-only), e.g. for the steps trained so far.
    manifest: dict[str, Any] = field(default_factory=dict)
    # The stage's inputs, checked against the manifest before the unit ran: input -> sha256.
    inputs: dict[Input, str] = field(default_factory=dict)

    def model_identity(self, model: str | Path) -> str:
        """What the unit's shards record as the model that wrote them (`distill.integrity`)."""
        return identity(self.manifest, self.paths.root, self.inputs, model)


@dataclass
class Result:
    """What a unit reports: the fields its manifest entry gains (metrics, artifacts, ...), and
    whether it stopped at a safe point before finishing (it resumes in its next allocation)."""

    fields: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False


def single_unit(cfg: RunConfig, it: int) -> list[str]:
    return ["0"]


def no_inputs(cfg: RunConfig, it: int) -> list[Input]:
    return []


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Unit], Result]
    plans: tuple[str, ...]
    # The unit keys of an iteration; a sharded stage records each unit under its entry's
    # `shards`, a single-unit stage ("0") in the entry itself.
    units: Callable[[RunConfig, int], list[str]] = single_unit
    sharded: bool = False
    # After every unit is done: combine their outputs, return the stage entry's fields.
    merge: Callable[[RunConfig, int, RunPaths, dict[str, Any]], dict[str, Any]] | None = None
    # True where the unit may be interrupted at any line; False: it polls `should_stop` and
    # returns at a safe point (training, between optimizer steps).
    stops_anywhere: bool = True
    # The recorded artifacts of earlier stages a unit reads, named through their producer's
    # `output`: each is checked against its hash before the unit runs (`distill.integrity`).
    inputs: Callable[[RunConfig, int], list[Input]] = no_inputs
    # The artifacts the stage records (its entry's `artifacts`), for later stages to read.
    produces: tuple[str, ...] = ()
    # For `distill repair`: the fields of a unit whose outputs are complete on disk, or None
    # when it has to run again (the default: nothing is taken on trust).
    recover: Callable[[Unit], Result | None] = lambda unit: None
    # The cluster profile section holding its jobs' resources (`stages.<resources>`).
    resources: str = ""
    # One line for the driver's log from the finished stage's manifest entry.
    summary: Callable[[dict[str, Any]], str] = lambda entry: ""
    # What one unit is called in messages ("shard", "evaluation task").
    unit_name: str = "shard"
    # Where an interrupted unit picks up when run again, for the driver's Ctrl-C line
    # ("train resumes from step 200"); "" where there is nothing worth saying.
    resume_point: Callable[[RunPaths, int], str] = lambda paths, it: ""
    # Whether a unit runs as several processes (torchrun ranks) when its job has several; None
    # for a stage that never does (its profile section may not ask for several nodes or tasks).
    distributed: Callable[[RunConfig], bool] | None = None
    # Why the stage cannot start from what earlier stages recorded (the manifest), or None: asked
    # before its jobs are submitted and again when a unit starts, whichever launcher started it.
    ready: Callable[[RunConfig, int, dict[str, Any]], str | None] = lambda cfg, it, manifest: None
    # Whether an iteration of this config has the stage at all (the score stage: only for an
    # objective that reads stored teacher logprobs); a stage it lacks is not run, waited for or shown.
    needed: Callable[[RunConfig, int], bool] = lambda cfg, it: True

    @property
    def resource_section(self) -> str:
        return self.resources or self.name

    def output(self, name: str, it: int) -> Input:
        """Artifact `name` as this stage records it in iteration `it`: how a later stage names
        what it reads, so a misspelt artifact fails where it is declared, not in a job."""
        if name not in self.produces:
            raise ValueError(f"stage {self.name} produces no artifact {name!r} (it produces: "
                             f"{', '.join(self.produces) or 'none'})")
        return Input(it, self.name, name)

    def checked(self, fields: dict[str, Any]) -> dict[str, Any]:
        """A unit's or a merge's fields, once the artifacts among them are ones it declares."""
        undeclared = sorted(set(fields.get("artifacts", {})) - set(self.produces))
        if undeclared:
            raise ValueError(f"stage {self.name} recorded undeclared artifact(s) {', '.join(undeclared)}")
        return fields

    def runs_distributed(self, cfg: RunConfig) -> bool:
        return self.distributed is not None and self.distributed(cfg)

    def describe(self, key: str) -> str:
        return f"{self.name} shard {key}" if self.sharded else self.name


def merged(outputs: dict[str, Path], merge: Callable[[list[Path]], T]) -> T:
    """`merge` of the units' output files (unit key -> file); a file that does not parse (cut
    short, or damaged after its unit ended) becomes `RedoUnit` for the unit that wrote it."""
    try:
        return merge(list(outputs.values()))
    except DataError as exc:
        bad = getattr(exc, "paths", [exc.path])
        keys = [k for k, p in outputs.items() if p in bad]
        if not keys:
            raise
        raise RedoUnit(str(exc), keys) from None
