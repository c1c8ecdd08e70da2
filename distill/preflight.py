"""Checks that read the filesystem, run on the login node before anything is submitted: the
model and data paths a config names exist, every problem file a job will read parses (and its
questions fit `data.max_question_chars`), and the run directory can be created.
"""

from __future__ import annotations

import os
from pathlib import Path

from distill.config import RunConfig
from distill.errors import ConfigError, DistillError
from distill.hub import MODEL_KEYS, hub_id
from distill.problems import problem_set, skipped_note


def check_paths(cfg: RunConfig) -> None:
    """Fail before submitting anything if a model or data path does not exist (hub IDs are
    resolved by `distill.hub`)."""
    from distill.benchmarks import find_benchmark

    for key in MODEL_KEYS:
        p = getattr(cfg.models, key)
        if not Path(p).exists() and hub_id(p) is None:
            raise ConfigError(f"{cfg.source}: models.{key}: path not found: {p} (a model is a local directory "
                              "or a hub ID, org/name[@revision])")
    for key in ("train", "validation", "test"):
        p = getattr(cfg.data, key)
        if p is None or find_benchmark(p):
            continue
        path = Path(p)
        if not (path.is_file() or (path.is_dir() and cfg.data.format in ("auto", "datasets"))):
            raise ConfigError(f"{cfg.source}: data.{key}: file not found: {p}")
    run_dir = Path(cfg.run_dir)
    existing = next(q for q in (run_dir, *run_dir.parents) if q.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "not a directory" if not existing.is_dir() else "not writable"
        raise ConfigError(f"{cfg.source}: run_root: cannot create the run directory {run_dir}: {existing} is {why}")


def check_inputs(cfg: RunConfig, it: int = 0) -> list[str]:
    """Read every input a job will read, so bad data fails on the login node, not in the queue.
    Returns one line per split whose too-long questions `data.too_long: skip` leaves out: the
    jobs leave them out silently, so this is where the count is said."""
    check_paths(cfg)
    splits = [("train", cfg.data.train_limit), (cfg.eval.split, cfg.eval.limit)]
    if it > 0:
        if getattr(cfg.data, cfg.undo.probe_split) is None:
            raise DistillError(f"{cfg.source}: undo.probe_split: data.{cfg.undo.probe_split} is not set")
        splits.append((cfg.undo.probe_split, cfg.undo.probe_limit))
    notes: list[str] = []
    for split, limit in splits:
        note = skipped_note(cfg.data, split, problem_set(cfg.data, split, limit))
        if note and note not in notes:
            notes.append(note)
    return notes
