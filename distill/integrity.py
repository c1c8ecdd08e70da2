"""Verify before use: what the manifest promises is checked against what is on disk.

Every artifact a finished stage leaves for a later one (the merged generations, the verified
set, the training set, the errors, a final model) is recorded in the manifest with its sha256.
A unit that consumes one hashes it again before use; a file that changed since, or is gone,
stops the unit with one line naming the file, and the stage that produced it is reopened so the
next run redoes it (a merged file is merged again from its shards; a final model is saved again
from the last checkpoint). Checkpoints carry their own hashes (`hashes.json`, written last, is
what makes a checkpoint complete), so a damaged newest one is set aside and training resumes
from the one before.

The full sha256 is used everywhere: it reads each file once (1.4 GB/s on one core, measured),
which is small beside loading the same weights onto a GPU, and a cheaper fingerprint (size, mtime)
misses a flipped byte. A model from outside the run (the teacher, the base student) has no
recorded hash; shards that depend on one are bound to its fingerprint instead
(`model_fingerprint`), since hashing 60 GB of teacher weights in every array task is not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.errors import DistillError
from distill.jsonl import atomic_write_text, sha256_file

log = logging.getLogger(__name__)


class Damaged(DistillError):
    """An artifact that does not match its recorded hash (or is gone)."""

    def __init__(self, message: str, producer: Input | None = None) -> None:
        super().__init__(message)
        self.producer = producer


@dataclass(frozen=True)
class Input:
    """An artifact a unit consumes: `name` in the `artifacts` of stage `stage` of `iteration`."""

    iteration: int
    stage: str
    name: str

    def describe(self) -> str:
        return f"{self.stage} of iteration {self.iteration}"


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a directory's files (names and contents), e.g. a saved model."""
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def artifact(path: str | Path, run_dir: str | Path, sha256: str | None = None) -> dict[str, str]:
    """An artifact record: its path relative to the run and its content hash (`sha256`, when
    the producer has just hashed it, saves reading a model twice)."""
    path = Path(path)
    try:
        rel = str(path.resolve().relative_to(Path(run_dir).resolve()))
    except ValueError:
        rel = str(path)
    return {"path": rel, "sha256": sha256 or content_hash(path)}


def recorded(manifest: dict[str, Any], item: Input) -> dict[str, str] | None:
    stages = manifest.get("iterations", {}).get(str(item.iteration), {}).get("stages", {})
    return stages.get(item.stage, {}).get("artifacts", {}).get(item.name)


def verify(manifest: dict[str, Any], run_dir: Path, item: Input) -> str | None:
    """The recorded sha256 of `item` after checking the file against it (None when nothing is
    recorded: the producer has not finished, so nothing was promised)."""
    record = recorded(manifest, item)
    if record is None:
        return None
    path = run_dir / record["path"]
    if not path.exists():
        raise Damaged(f"{path}: missing, though {item.describe()} recorded it", item)
    if content_hash(path) != record["sha256"]:
        raise Damaged(f"{path}: changed since {item.describe()} recorded it (sha256 differs)", item)
    return record["sha256"]


def set_aside(path: Path) -> None:
    """Rename a damaged file or directory to `<name>.damaged` (kept for a look, never used)."""
    if not path.exists():
        return
    aside = path.with_name(path.name + ".damaged")
    if aside.is_dir():
        shutil.rmtree(aside)
    os.replace(path, aside)


def nonfinite_tensor(path: Path) -> str | None:
    """The first tensor holding an inf or NaN in a safetensors file, or in the `*.safetensors`
    files of a model directory (`file:tensor`); None when every value is finite.

    A hash says a file is the one that was written, not that what was written is a model: weights
    that overflowed hash like any others. Read lazily, one tensor at a time, so a check costs one
    pass over the file with at most its largest tensor in memory. A directory without safetensors
    files cannot be checked and raises FileNotFoundError.
    """
    import torch
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = st.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    return f"{f.name}:{name}"
    return None


def model_fingerprint(path: str | Path) -> str:
    """A cheap identity of a model directory: each file's name, size and mtime. Used to bind
    shards to a model from outside the run, whose contents the run never hashed."""
    path = Path(path)
    h = hashlib.sha256(str(path.resolve()).encode())
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def identity(manifest: dict[str, Any], run_dir: Path, verified: dict[Input, str], model: str | Path) -> str:
    """What a shard records as the model that wrote it: the sha256 the manifest holds for the
    run's own model at `model` (already verified), else the fingerprint of an outside model."""
    target = Path(model).resolve()
    for item, digest in verified.items():
        record = recorded(manifest, item)
        if record is not None and (run_dir / record["path"]).resolve() == target:
            return f"sha256:{digest}"
    return f"fingerprint:{model_fingerprint(model)}"


# -- outputs bound to their inputs ---------------------------------------------------------------


def source_file(shard: Path) -> Path:
    return shard.with_name(shard.name + ".source.json")


def bind(shard: Path, source: dict[str, Any], *derived: Path) -> bool:
    """Tie a resumable shard to what produces it (the model's identity, the prompt and sampling
    settings). A shard on disk written by anything else (or with no record of its source) is
    removed with the files derived from it, so it is redone rather than resumed; returns
    whether that happened."""
    record = source_file(shard)
    try:
        same = json.loads(record.read_text()) == source
    except (OSError, ValueError):
        same = False
    stale = not same and any(p.exists() for p in (shard, *derived))
    if stale:
        log.warning("%s: written by another model or other settings (see %s): redone", shard, record.name)
        for p in (shard, *derived):
            p.unlink(missing_ok=True)
    if not same:
        shard.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(source, sort_keys=True, indent=1) + "\n")
    return stale


# -- checkpoints ---------------------------------------------------------------------------------

HASHES = "hashes.json"


def seal(directory: Path) -> None:
    """Record the hash of every file in a checkpoint directory; written last, it marks the
    checkpoint complete."""
    hashes = {f.name: sha256_file(f) for f in sorted(directory.iterdir()) if f.is_file() and f.name != HASHES}
    (directory / HASHES).write_text(json.dumps(hashes, indent=1))


def seal_digest(directory: Path) -> str:
    """The sha256 of a sealed directory's seal, which names the hash of every file in it: one
    value that pins the whole checkpoint, for what is derived from it (the final model)."""
    return sha256_file(directory / HASHES)


def is_sealed(directory: Path) -> bool:
    return (directory / HASHES).is_file()


def seal_damage(directory: Path) -> str | None:
    """What is wrong with a sealed directory (one phrase), or None when every file matches."""
    try:
        hashes = json.loads((directory / HASHES).read_text())
    except (OSError, ValueError):
        return f"{HASHES} unreadable"
    for name, digest in hashes.items():
        f = directory / name
        if not f.is_file():
            return f"{name} missing"
        if sha256_file(f) != digest:
            return f"{name} does not match its hash"
    return None
