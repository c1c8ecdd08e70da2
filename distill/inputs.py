"""The data files a run reads, bound to the run by their contents.

The config hash covers the data *paths*; a file edited between iterations (new gold answers, a
training file cut short) would otherwise be read by iteration 1 as if it were iteration 0's, and
the report would compare accuracies graded against different golds. So the sha256 of every split
a run reads is recorded in the manifest when the run starts (`data` key), and every later start
(the driver, `jobs.sbatch`, each unit) compares the files against it: a changed file is refused
with one line naming it, unless the user accepts the change explicitly, which is then recorded in
the manifest's history like an allowed config change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.config import RunConfig
from distill.errors import DistillError
from distill.integrity import content_hash

SPLITS = ("train", "validation", "test")


def source_path(ref: str) -> Path:
    """The file (or `datasets` directory) a split reads: a benchmark's bundled file, or the path."""
    from distill.benchmarks import find_benchmark

    bench = find_benchmark(ref)
    return bench.path if bench is not None else Path(ref)


def data_hashes(cfg: RunConfig) -> dict[str, dict[str, str]]:
    """`data.<split>` -> {path, sha256} for every split the config sets."""
    out = {}
    for split in SPLITS:
        ref = getattr(cfg.data, split)
        if ref is not None:
            path = source_path(ref)
            out[f"data.{split}"] = {"path": str(path), "sha256": content_hash(path) if path.exists() else "missing"}
    return out


def data_changes(cfg: RunConfig, recorded: dict[str, dict[str, str]]) -> dict[str, tuple[str, str]]:
    """key -> (recorded sha256, current sha256) for each split whose file no longer holds what
    the run recorded; splits the run has not recorded (a run started before binding) are not
    compared."""
    now = data_hashes(cfg)
    return {key: (rec["sha256"], now[key]["sha256"]) for key, rec in recorded.items()
            if key in now and now[key]["sha256"] != rec["sha256"]}


def refuse_changed_data(cfg: RunConfig, run_dir: Path, changes: dict[str, tuple[str, str]]) -> None:
    """One line naming the first changed file and what to do."""
    if not changes:
        return
    key, (old, new) = next(iter(changes.items()))
    more = f" (and {len(changes) - 1} more file(s))" if len(changes) > 1 else ""
    path = source_path(getattr(cfg.data, key.removeprefix("data.")))
    what = ("is missing" if new == "missing"
            else f"changed since {run_dir} started (sha256 {old[:12]}... -> {new[:12]}...)")
    raise DistillError(f"{path}: {key} {what}{more}; restore the file, start another run (RUN=<new name>), or "
                       "accept the change with --accept-data-change (recorded in the manifest's history)")


def recorded_data(manifest: dict[str, Any]) -> dict[str, dict[str, str]]:
    return manifest.get("data", {})
