"""Running the units of a stage, and the one place that records what happened to them.

Whatever launched a unit (a submitit job on SLURM or in a local subprocess, a plain sbatch
script, a test), `run_unit` marks it running, runs it and records one of three outcomes: done
(with the fields it reported), stopped at a safe point (pending again: its next allocation
resumes it), or failed with a one-line reason. A stage's merge goes through `merge_stage`, and
the driver's bookkeeping (submitted job ids, a stage that cannot go on) through the functions
below: every state in the manifest is written here, the same way for every launcher.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distill.config import MUTABLE_KEYS, RunConfig, config_changes, load_config
from distill.cost import close_allocation, open_allocation
from distill.errors import DistillError, NoSpace, is_no_space, no_space
from distill.hub import local_models
from distill.inputs import data_changes, data_hashes, recorded_data, refuse_changed_data
from distill.integrity import Damaged, Input, set_aside, verify
from distill.interrupts import ignore_sigint
from distill.jsonl import atomic_write_text
from distill.layout import RunPaths
from distill.lease import UnitBeat, live_holder, me
from distill.manifest import Manifest, now, set_shard_state, set_stage_state, stage_entry
from distill.progress import reporting
from distill.stage import RedoUnit, Result, Stage, Stopped, Unit


@dataclass(frozen=True)
class Outcome:
    state: str  # done | stopped | failed
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    bad_input: bool = False  # failed on a DistillError: input to fix, not a crash


REASON_CHARS = 300  # a reason in the manifest: one line, at most this long


def first_line(exc: BaseException) -> str:
    """An exception as one line for the manifest: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return short(f"{type(exc).__name__}: {text[0] if text else ''}")


def short(reason: str) -> str:
    return reason.strip().splitlines()[0][:REASON_CHARS] if reason.strip() else ""


def manifest_of(cfg: RunConfig) -> Manifest:
    return Manifest(cfg.run_dir, soft_lock=cfg.lock == "soft")


def started_config(paths: RunPaths) -> RunConfig | None:
    """The config the run was started with (or last changed to), None where it cannot be read."""
    try:
        return load_config(paths.config)
    except DistillError:
        return None


def check_run(cfg: RunConfig, *, accept_data: bool = False) -> dict[str, tuple[Any, Any]]:
    """Before anything is written: refuse a config that differs from the run's in a key that
    shapes what finished stages wrote, naming the keys, and a data file whose contents differ
    from those the run recorded (`distill.inputs`; unless `accept_data`); return the changes a
    started run may take (`MUTABLE_KEYS`: how far it goes, how much memory its engines take),
    key -> (old, new)."""
    changes = _config_changes(cfg)
    if not accept_data:
        refuse_changed_data(cfg, cfg.run_dir, data_changes(cfg, recorded_data(manifest_of(cfg).read())))
    return changes


def _config_changes(cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    paths, current = RunPaths(cfg.run_dir), manifest_of(cfg).read().get("config_hash")
    if current is None or current == cfg.hash():
        return {}
    old = started_config(paths)
    changes = config_changes(old, cfg) if old is not None else {}
    fixed = [k for k in changes if k not in MUTABLE_KEYS]
    if changes and not fixed:
        return changes
    if fixed:
        shown = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in fixed[:3])
        more = f" (and {len(fixed) - 3} more)" if len(fixed) > 3 else ""
        raise DistillError(f"{cfg.source}: {shown}{more}: differs from the config {paths.root} was started with "
                           f"({paths.config}); undo the change, or start another run (RUN=<new name>)")
    raise DistillError(
        f"{cfg.source}: config differs from the one {paths.root} was started with "
        f"({cfg.hash()} vs {current}, see {paths.config}); use another run name (RUN=...)"
    )


def open_run(cfg: RunConfig, *, record: bool = False, accept_data: bool = False) -> tuple[RunPaths, Manifest]:
    """Create the run directory on first use, binding its data files (`distill.inputs`); refuse
    a config or data file that differs from the run's (`check_run`). With `record` (the driver,
    `jobs.sbatch prepare`), an allowed config change, or a data change the user accepted, is
    saved: the run's config file, hash and data hashes take the new values and the manifest's
    `history` lists what changed."""
    changes = check_run(cfg, accept_data=accept_data)
    paths, manifest = RunPaths(cfg.run_dir), manifest_of(cfg)
    if manifest.read().get("config_hash") is None:
        paths.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(paths.config, cfg.to_yaml())
        manifest.set_meta(run=cfg.name, config_hash=cfg.hash(), config=str(paths.config), data=data_hashes(cfg))
        return paths, manifest
    if not record:
        return paths, manifest
    data_changed = data_changes(cfg, recorded_data(manifest.read()))
    if changes:
        atomic_write_text(paths.config, cfg.to_yaml())
    if changes or data_changed or "data" not in manifest.read():
        with manifest.update() as data:
            data["config_hash"] = cfg.hash()
            data["data"] = data_hashes(cfg)
            event = {"changed": {k: [old, new] for k, (old, new) in changes.items()},
                     "data_changed": {k: [old, new] for k, (old, new) in data_changed.items()}}
            if any(event.values()):
                data.setdefault("history", []).append({"time": now(), **{k: v for k, v in event.items() if v}})
    return paths, manifest


def unit_entry(data: dict[str, Any], it: int, stage: Stage, key: str, create: bool = False) -> dict[str, Any]:
    entry = stage_entry(data, it, stage.name, create=create)
    if not stage.sharded:
        return entry
    shards = entry.setdefault("shards", {}) if create else entry.get("shards", {})
    return shards.setdefault(key, {}) if create else shards.get(key, {})


def unit_done(cfg: RunConfig, it: int, stage: Stage, key: str) -> bool:
    return unit_entry(manifest_of(cfg).read(), it, stage, key).get("state") == "done"


def _mark(manifest: Manifest, it: int, stage: Stage, key: str, state: str, **fields: Any) -> None:
    """Set a unit's state and fields, closing its open allocation (`distill.cost`)."""
    stage.checked(fields)
    with manifest.update() as data:
        entry = unit_entry(data, it, stage, key, create=True)
        if stage.sharded:
            stage_entry(data, it, stage.name).setdefault("state", "running")
            set_shard_state(entry, state, **fields)
        else:
            set_stage_state(entry, state, **fields)
        close_allocation(entry, state, RunPaths(manifest.run_dir).heartbeat(it, stage.name, key))


def unit_holder(data: dict[str, Any], paths: RunPaths, it: int, stage: Stage, key: str) -> str | None:
    """"pid P on host H" when a live process runs the unit (another driver's job, a
    `jobs.sbatch` started by hand, on any host: `distill.lease.live_holder`), else None."""
    entry = unit_entry(data, it, stage, key)
    if entry.get("state") != "running":
        return None
    return live_holder(entry, beat=paths.heartbeat(it, stage.name, key))


def owns(manifest: Manifest, it: int, stage: Stage, key: str) -> bool:
    """Whether the manifest still names this process as the unit's runner."""
    entry = unit_entry(manifest.read(), it, stage, key)
    return (entry.get("host"), entry.get("pid")) == (me()["host"], me()["pid"])


def claim(manifest: Manifest, it: int, stage: Stage, key: str, job_id: str | None) -> None:
    """Mark the unit running, as this process on this host, unless a live process already runs
    it (a driver's job beside a `jobs.sbatch` started by hand, or another driver's job after a
    lease takeover): then refuse, changing nothing. Check and mark are one manifest update, so
    two starters cannot both pass."""
    with manifest.update() as data:
        entry = unit_entry(data, it, stage, key, create=True)
        holder = unit_holder(data, RunPaths(manifest.run_dir), it, stage, key)
        if holder is not None:
            raise DistillError(f"{stage.describe(key)} is already running ({holder}, job {entry.get('job_id')}); "
                               f"not started twice")
        if stage.sharded:
            stage_entry(data, it, stage.name).setdefault("state", "running")
            set_shard_state(entry, "running", job_id=job_id, **me())
        else:
            set_stage_state(entry, "running", job_id=job_id, **me())
            entry["allocations"] = entry.get("allocations", 0) + 1
        open_allocation(entry, RunPaths(manifest.run_dir).heartbeat(it, stage.name, key))


def leads() -> bool:
    """Whether this process speaks for its unit: always, but among torchrun's ranks only rank 0."""
    return os.environ.get("RANK", "0") == "0"


def run_unit(cfg: RunConfig, it: int, stage: Stage, key: str, *, job_id: str | None = None,
             should_stop: Callable[[], bool] | None = None, progress: bool = True) -> Outcome:
    """Run one unit and record its outcome. A crash is recorded as failed and re-raised only
    when it is an interruption (KeyboardInterrupt, SystemExit); otherwise its traceback goes to
    stderr (the job's log) and the outcome says `failed` with the one-line reason. A manifest
    that cannot be written (a full disk) raises: nothing can record that. While it runs, its
    progress bars also write its progress file (`RunPaths.progress`, see `distill.progress`).

    In a unit run by several processes (torchrun ranks), rank 0 alone claims and records it
    and reports progress; the other ranks only do their share of the work."""
    paths, manifest = open_run(cfg)
    leader = leads()
    mark = _mark if leader else lambda *args, **fields: None
    refusal = stage.ready(cfg, it, manifest.read())
    if refusal is not None:
        mark(manifest, it, stage, key, "failed", error=short(refusal))
        return Outcome("failed", error=refusal, bad_input=True)
    if leader:
        claim(manifest, it, stage, key, job_id)
    figure = paths.progress(it, stage.name, key) if leader else None
    if figure is not None:
        with contextlib.suppress(OSError):
            figure.unlink(missing_ok=True)  # an earlier attempt's figure is not this one's
    beat = UnitBeat(paths.heartbeat(it, stage.name, key) if leader else None, lambda: owns(manifest, it, stage, key))
    user_stop = should_stop or (lambda: False)
    try:
        with beat:
            data = manifest.read()
            unit = Unit(local_models(cfg, data.get("models", {})), it, key, paths,
                        should_stop=lambda: user_stop() or beat.lost.is_set(), progress=progress, manifest=data)
            unit.inputs = verified_inputs(stage, unit)
            with reporting(figure):
                result: Result = stage.run(unit)
    except Stopped:
        result = Result(stopped=True)
    except BaseException as exc:
        if not isinstance(exc, Exception):
            if isinstance(exc, KeyboardInterrupt):
                ignore_sigint()  # a second Ctrl-C must not leave the unit `running`
            mark(manifest, it, stage, key, "failed", error=interrupted_reason(exc))
            raise
        if is_no_space(exc) and not isinstance(exc, NoSpace):
            exc = no_space(paths.root)  # out of space where no write named its file
        reason = short(str(exc)) if isinstance(exc, NoSpace | Damaged) else first_line(exc)
        if isinstance(exc, Damaged) and exc.producer is not None and leader:
            reason = short(f"{exc}; {reopen(manifest, exc.producer, str(exc))}")
        if leader and not owns(manifest, it, stage, key):
            return taken_over(stage, key)
        mark(manifest, it, stage, key, "failed", error=reason)
        if not isinstance(exc, DistillError):
            traceback.print_exc(file=sys.stderr)
        return Outcome("failed", error=reason, bad_input=isinstance(exc, DistillError))
    if leader and not owns(manifest, it, stage, key):
        return taken_over(stage, key)
    if result.stopped:
        mark(manifest, it, stage, key, "pending", **result.fields)
        return Outcome("stopped", result.fields)
    mark(manifest, it, stage, key, "done", **result.fields)
    return Outcome("done", result.fields)


def taken_over(stage: Stage, key: str) -> Outcome:
    """A unit another process took over while this one was not renewing its heartbeat (stopped,
    or cut off from the filesystem): the manifest is that process's to write, so nothing is
    recorded here."""
    return Outcome("failed", error=f"{stage.describe(key)} was taken over by another process; "
                   "stopped without recording anything")


def verified_inputs(stage: Stage, unit: Unit) -> dict[Input, str]:
    """The recorded artifacts the unit reads, each checked against its hash: input -> sha256."""
    out = {}
    for item in stage.inputs(unit.cfg, unit.iteration):
        digest = verify(unit.manifest, unit.paths.root, item)
        if digest is not None:
            out[item] = digest
    return out


def reopen(manifest: Manifest, producer: Input, reason: str) -> str:
    """Send the stage that produced a damaged artifact back to pending, so the next run redoes
    it (a sharded stage whose shards are done merges again), with the damaged file set aside as
    `<name>.damaged` so the producer writes it anew; says so in a phrase."""
    with manifest.update() as data:
        entry = stage_entry(data, producer.iteration, producer.stage, create=True)
        record = entry.get("artifacts", {}).get(producer.name)
        entry["state"] = "pending"
        entry["error"] = short(reason)
        entry.pop("artifacts", None)
    if record is not None:
        set_aside(manifest.run_dir / record["path"])
    return f"{producer.describe()} is marked pending: run again to redo it"


def interrupted_reason(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "stopped by Ctrl-C (SIGINT); run again to resume"
    return first_line(exc)


def requeued_unit(cfg: RunConfig, it: int, stage: Stage, key: str) -> None:
    """A stopped unit whose job was requeued: pending, not failed; the same job continues in
    its next allocation."""
    with manifest_of(cfg).update() as data:
        entry = unit_entry(data, it, stage, key, create=True)
        entry["state"] = "pending"
        entry.pop("error", None)
        entry["requeued"] = entry.get("requeued", 0) + 1


def fail_unit(cfg: RunConfig, it: int, stage: Stage, key: str, reason: str) -> None:
    """A unit that will not go on (e.g. stopped once too often to be requeued again)."""
    _mark(manifest_of(cfg), it, stage, key, "failed", error=short(reason))


class UnitsReopened(DistillError):
    """A merge found units' outputs short or damaged and marked them failed: running them again
    (only what they lack is redone) and merging again heals the stage."""


def merge_stage(cfg: RunConfig, it: int, stage: Stage) -> dict[str, Any]:
    """Merge a sharded stage whose units are all done and record it done. A unit whose output
    turns out damaged is marked failed, so the next run redoes it (and only it)."""
    paths, manifest = open_run(cfg)
    try:
        fields = stage.merge(cfg, it, paths, manifest.stage(it, stage.name)) if stage.merge else {}
    except RedoUnit as exc:
        for key in exc.keys:
            manifest.mark_shard(it, stage.name, key, "failed", error=short(str(exc)))
        which = f"shard {exc.keys[0]} is" if len(exc.keys) == 1 else f"shards {', '.join(exc.keys)} are"
        raise UnitsReopened(f"{exc}; {stage.name} {which} marked failed: run again to redo it") from None
    manifest.mark(it, stage.name, "done", **stage.checked(fields))
    return fields


def record_recovered(cfg: RunConfig, it: int, stage: Stage, key: str, fields: dict[str, Any]) -> None:
    """A unit `distill repair` found complete on disk: done, with the fields it reported."""
    _mark(manifest_of(cfg), it, stage, key, "done", recovered=True, **fields)


def fail_stage(cfg: RunConfig, it: int, stage: str, reason: str) -> None:
    manifest_of(cfg).mark(it, stage, "failed", error=short(reason))


def record_submitted(cfg: RunConfig, it: int, stage: str, job_ids: dict[str, str]) -> None:
    """Which job runs which unit (`"0": "1234_0"`), so a later driver can ask squeue."""
    manifest_of(cfg).add_job_ids(it, stage, job_ids)
