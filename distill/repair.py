"""`python -m distill repair`: rebuild a run's manifest from what is on disk and sound.

A manifest that was deleted, cut short or hand-edited into nonsense need not cost the run: the
outputs are still there. Each stage of each iteration on disk says which of its units are
complete (`Stage.recover`: a shard with every record, a model beside a sealed checkpoint at the
last step, readable files), those are recorded done, and a sharded stage whose units are all
done is merged again. Anything else stays pending, so the next `make iter` redoes it, and only it.
The old manifest, if there was one, is kept as `manifest.json.before-repair`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from distill import pipeline
from distill.config import RunConfig, load_config
from distill.errors import DataError, DistillError
from distill.layout import RunPaths
from distill.manifest import Manifest
from distill.runner import merge_stage, open_run, record_recovered
from distill.stage import Stage, Unit


def iterations_on_disk(paths: RunPaths) -> list[int]:
    found = (re.fullmatch(r"iter-(\d+)", p.name) for p in paths.root.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def recover_stage(cfg: RunConfig, it: int, stage: Stage) -> str:
    """Record the stage's complete units done (merging when all are); its state afterwards."""
    paths, manifest = RunPaths(cfg.run_dir), Manifest(cfg.run_dir)
    keys = stage.units(cfg, it)
    recovered = 0
    for key in keys:
        unit = Unit(cfg, it, key, paths, progress=False, manifest=manifest.read())
        try:
            result = stage.recover(unit)
        except (DataError, OSError, KeyError, ValueError):
            result = None  # unreadable or incomplete: redone
        if result is not None:
            record_recovered(cfg, it, stage, key, result.fields)
            recovered += 1
    if recovered < len(keys):
        return f"{recovered}/{len(keys)} recovered, the rest runs again" if recovered else "runs again"
    if stage.merge is not None:
        try:
            merge_stage(cfg, it, stage)
        except DistillError as exc:
            return f"merge failed, runs again: {exc}"
    return "done"


def repair(run_dir: Path) -> list[tuple[int, str, str]]:
    """Rebuild `run_dir`'s manifest; (iteration, stage, state) for every stage looked at."""
    paths = RunPaths(run_dir)
    if not paths.config.exists():
        raise DistillError(f"{paths.config}: missing; repair needs the config the run was started with")
    cfg = load_config(paths.config)
    if cfg.run_dir.resolve() != paths.root.resolve():
        raise DistillError(f"{paths.config}: names the run directory {cfg.run_dir}, not {paths.root}; run repair from "
                           "where the run was started (the config's paths are relative to it)")
    if paths.manifest.exists():
        os.replace(paths.manifest, paths.manifest.with_name(paths.manifest.name + ".before-repair"))
    open_run(cfg)
    report = []
    for it in iterations_on_disk(paths):
        stages = pipeline.iteration_plan(it, cfg) + [s for s in pipeline.baseline_plan()]
        for stage in stages:
            report.append((it, stage.name, recover_stage(cfg, it, stage)))
    return report
