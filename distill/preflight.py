"""Checks that read the filesystem, run on the login node before anything is submitted: the
model and data paths a config names exist, every problem file a job will read parses (and its
questions fit `data.max_question_chars`), each local model folder has a working tokenizer, and
the run directory can be created.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from distill.config import PromptConfig, RunConfig
from distill.errors import ConfigError, DataError, DistillError
from distill.hub import MODEL_KEYS, hub_id
from distill.integrity import model_fingerprint
from distill.jsonl import atomic_write_text
from distill.problems import problem_set, skipped_note, split_overlap


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
    check_tokenizers(cfg)
    return notes + contamination_notes(cfg, it)


def contamination_notes(cfg: RunConfig, it: int = 0) -> list[str]:
    """One line per training or probe split holding near-copies of evaluated problems; with
    `data.decontaminate: refuse`, a DataError instead."""
    notes = []
    for split in ["train"] + ([cfg.undo.probe_split] if it > 0 else []):
        found = split_overlap(cfg, split)
        if found is None or not found.copies:
            continue
        line = found.line(split, cfg.eval.split, cfg.data.decontaminate_share, cfg.data.decontaminate)
        if cfg.data.decontaminate == "refuse":
            raise DataError(f"{cfg.source}: data.decontaminate: {line} (drop leaves them out)")
        notes.append(line)
    return notes


# Encoded and decoded by each tokenizer: any tokenizer a math model can use splits it into
# several tokens and gives it back.
PROBE = "1 + 2 = 3"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
NO_TOKENIZER = "has no usable tokenizer (tokenizer.json / tokenizer_config.json missing or unreadable: {})"


def check_tokenizers(cfg: RunConfig) -> None:
    """Fail before submitting anything if a local model folder has no working tokenizer.

    From a folder with only config.json and weights, `AutoTokenizer` builds a tokenizer of one
    token without complaint: the teacher then crashes with an IndexError in its job and a
    student trains at loss 0.0. Hub IDs are skipped: their snapshots are resolved later, by
    `distill.hub`. transformers is imported only when a folder is checked (about 3 s), not
    at module level."""
    seen: dict[str, str | None] = {}
    for key in MODEL_KEYS:
        path = getattr(cfg.models, key)
        if hub_id(path) is not None or not Path(path).is_dir():
            continue
        if path not in seen:
            seen[path] = tokenizer_problem(path, cfg.prompt)
        if seen[path] is not None:
            raise ConfigError(f"{cfg.source}: models.{key}: {path} {seen[path]}")


def tokenizer_problem(path: str, prompt: PromptConfig) -> str | None:
    """What is wrong with the tokenizer of model folder `path` for this prompt, or None."""
    facts = tokenizer_facts(path)
    if isinstance(facts, str):
        return facts
    if prompt.use_chat_template and prompt.chat_template_kwargs and not facts["chat_template"]:
        return (f"has no chat template, so prompt.chat_template_kwargs ({', '.join(prompt.chat_template_kwargs)}) "
                "would be ignored and prompts sent as plain text; remove them, or use a model that ships a chat "
                "template")
    return None


def tokenizer_facts(path: str) -> dict[str, Any] | str:
    """`{"chat_template": bool}` for a working tokenizer, else why it does not work.

    A working tokenizer is remembered under the folder's fingerprint (each file's name, size and
    mtime) and the transformers version: a driver re-run on a finished iteration then answers
    without importing transformers, and any change to the folder checks it again."""
    key = tokenizer_key(path)
    known = read_checked().get(key)
    if isinstance(known, dict) and isinstance(known.get("chat_template"), bool):
        return {"chat_template": known["chat_template"]}
    facts = inspect_tokenizer(path)
    if not isinstance(facts, str):
        remember_checked(key, path, facts)
    return facts


def inspect_tokenizer(path: str) -> dict[str, Any] | str:
    """Load the tokenizer of `path` as a job would and try it on `PROBE`."""
    try:
        tokenizer = load_local_tokenizer(path)
    except Exception as exc:  # transformers raises OSError, ValueError, JSON and tokenizers errors alike
        return NO_TOKENIZER.format(broken_json(Path(path)) or first_line(exc))
    if len(tokenizer) <= 1:
        files = any((Path(path) / name).is_file() for name in TOKENIZER_FILES)
        absent = "" if files else "neither file is in the folder, and "
        return NO_TOKENIZER.format(f"{absent}transformers builds a vocabulary of {len(tokenizer)} token from it")
    ids = tokenizer.encode(PROBE, add_special_tokens=False)
    back = tokenizer.decode(ids, skip_special_tokens=True)
    if len(ids) <= 1 or back.split() != PROBE.split():
        return NO_TOKENIZER.format(f"it encodes {PROBE!r} as {ids[:16]}, which decodes to {back[:80]!r}")
    return {"chat_template": bool(getattr(tokenizer, "chat_template", None))}


def checked_file() -> Path:
    """Where working tokenizers are remembered: a user cache, as model folders may be read-only."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distill" / "tokenizers-checked.json"


def tokenizer_key(path: str) -> str:
    """The identity a check is remembered under: the folder's files and the transformers that loaded them."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        transformers = version("transformers")
    except PackageNotFoundError:
        transformers = "absent"
    return hashlib.sha256(f"{transformers}:{model_fingerprint(path)}".encode()).hexdigest()


def read_checked() -> dict[str, Any]:
    """The remembered checks; a missing or damaged cache is an empty one."""
    try:
        entries = json.loads(checked_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def remember_checked(key: str, path: str, facts: dict[str, Any]) -> None:
    """Add a working tokenizer to the cache, dropping the entries of folders that are gone.
    Best effort: a cache that cannot be written only means checking again next time."""
    entries = {key: entry for key, entry in read_checked().items()
               if isinstance(entry, dict) and Path(str(entry.get("path"))).is_dir()}
    entries[key] = {"path": str(Path(path).resolve()), **facts}
    with contextlib.suppress(OSError, DistillError):  # DistillError: out of disk space
        atomic_write_text(checked_file(), json.dumps(entries, indent=1, sort_keys=True) + "\n")


def load_local_tokenizer(path: str) -> Any:
    """The tokenizer a job would load from `path`, from local files only, with transformers'
    own warnings kept off the start-up output."""
    import warnings

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)


def broken_json(folder: Path) -> str | None:
    """Which tokenizer file of `folder` is not valid JSON, and where: transformers' own error
    gives only the position, not the file."""
    for name in TOKENIZER_FILES:
        try:
            json.loads((folder / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"{name}: {exc}"
    return None


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line: transformers' messages run over several."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else f"{text[:limit]}…"
