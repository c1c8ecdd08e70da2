"""What a run cost: wall time and CPU/GPU-hours per stage and iteration, from the manifest.

A unit may take several allocations (stopped at its time limit, preempted, requeued). The
runner opens an allocation record when it claims a unit (when, and the CPUs, GPUs and nodes the
process was given) and closes it when the unit ends, stops or fails, appending it to the unit's
`spent` list. An allocation whose process was killed before it could say so is closed by the
next claim (or by `distill repair`) at its last heartbeat. So every allocation of a requeued
unit counts once. A stage's wall time is the time at least one of its units ran (queue waits
excluded); CPU- and GPU-hours are each allocation's seconds times what it was given.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.lease import last_beat, me

OPEN, SPENT = "allocation_open", "spent"


def _count(devices: str) -> int:
    return len([d for d in devices.split(",") if d.strip() and d.strip() != "-1"])


def resources(env: Mapping[str, str] = os.environ) -> dict[str, int]:
    """The nodes, CPUs and GPUs this process's allocation holds: SLURM's figures inside a job
    (per node times nodes), otherwise this machine's (CPUs this process may use, GPUs visible)."""
    if env.get("SLURM_JOB_ID"):
        nodes = int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
        cpus = int(env.get("SLURM_CPUS_ON_NODE") or len(os.sched_getaffinity(0)))
        gpus = int(env.get("SLURM_GPUS_ON_NODE") or _count(env.get("CUDA_VISIBLE_DEVICES", "")))
        return {"nodes": nodes, "cpus": cpus * nodes, "gpus": gpus * nodes}
    visible = env.get("CUDA_VISIBLE_DEVICES")
    gpus = _count(visible) if visible is not None else len(glob.glob("/dev/nvidia[0-9]*"))
    return {"nodes": 1, "cpus": len(os.sched_getaffinity(0)), "gpus": gpus}


def open_allocation(entry: dict[str, Any], beat: Path | None) -> None:
    """A unit claimed by this process: close an earlier allocation left open (its process was
    killed), then open this one."""
    close_allocation(entry, "lost", beat)
    entry[OPEN] = {"start": round(time.time(), 3), **me(), **resources()}


def close_allocation(entry: dict[str, Any], how: str, beat: Path | None) -> None:
    """Record the unit's open allocation as spent, ended `how` (done, pending, failed). It ends
    now when this process holds it; otherwise (its process is gone) at its last heartbeat."""
    held = entry.pop(OPEN, None)
    if held is None:
        return
    start = float(held["start"])
    mine = (held.get("host"), held.get("pid")) == (me()["host"], me()["pid"])
    end = time.time() if mine else min(time.time(), max(start, last_beat({}, beat)))
    entry.setdefault(SPENT, []).append({
        "start": start, "seconds": round(end - start, 3), "ended": how if mine else "lost",
        **{k: held[k] for k in ("nodes", "cpus", "gpus")},
    })


@dataclass(frozen=True)
class Cost:
    """What some allocations cost: wall time (the union of their spans), CPU- and GPU-hours."""

    wall_s: float
    cpu_h: float
    gpu_h: float
    allocations: int

    @classmethod
    def of(cls, spent: Iterable[dict[str, Any]]) -> Cost | None:
        spans = sorted((float(a["start"]), float(a["start"]) + float(a["seconds"]), a) for a in spent)
        if not spans:
            return None
        wall, reach = 0.0, float("-inf")
        for start, end, _ in spans:
            wall += max(0.0, end - max(start, reach))
            reach = max(reach, end)
        return cls(wall, sum(a["seconds"] * a["cpus"] for *_, a in spans) / 3600,
                   sum(a["seconds"] * a["gpus"] for *_, a in spans) / 3600, len(spans))


def stage_spent(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Every closed allocation of a stage's units (its shards', or its own)."""
    units = list(entry.get("shards", {}).values()) or [entry]
    return [a for unit in units for a in unit.get(SPENT, [])]


def cost_rows(data: dict[str, Any], order: list[str], baseline: set[str]) -> list[dict[str, Any]]:
    """One row per iteration and stage that recorded allocations, then one per iteration: its
    stages' total, the one-shot baseline's stages (`baseline`) apart. Stages in `order`."""
    rows = []
    for it in sorted(data.get("iterations", {}), key=int):
        stages = data["iterations"][it].get("stages", {})
        names = sorted(stages, key=lambda n: (order.index(n) if n in order else len(order), n))
        spent = {name: stage_spent(stages[name]) for name in names}
        for name in names:
            cost = Cost.of(spent[name])
            if cost is not None:
                rows.append({"iteration": int(it), "stage": name, **_fields(cost)})
        for label, part in (("iteration", [n for n in names if n not in baseline]),
                            ("one-shot baseline", [n for n in names if n in baseline])):
            cost = Cost.of(a for n in part for a in spent[n])
            if cost is not None:
                rows.append({"iteration": int(it), "stage": f"({label} total)", **_fields(cost)})
    return rows


def _fields(cost: Cost) -> dict[str, Any]:
    return {"wall_s": round(cost.wall_s, 1), "cpu_hours": round(cost.cpu_h, 4), "gpu_hours": round(cost.gpu_h, 4),
            "allocations": cost.allocations}


def duration(seconds: float) -> str:
    """`1h02m`, `3m05s`, `12.3s`."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"
