"""Errors that reach the user as one line, naming the file and the place."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class DistillError(Exception):
    """Bad input or a refused action; the CLI prints it on one line and exits 2."""


class ConfigError(DistillError):
    """A config file that does not match the schema (`file: key.path: reason`)."""


class DataError(DistillError):
    """A data file that cannot be read (`file:line: reason`); `path` names the file."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


class IncompleteShards(DataError):
    """Shard files that lack records their unit recorded as written: each unit runs again."""

    def __init__(self, message: str, paths: list[Path]) -> None:
        super().__init__(message, paths[0] if paths else None)
        self.paths = list(paths)


class NotReady(DistillError):
    """A stage that cannot start from what earlier stages recorded (`Stage.ready`)."""


class NoSpace(DistillError):
    """A write that ran out of disk space: one line naming the filesystem and the file."""


def is_no_space(exc: BaseException) -> bool:
    """ENOSPC however it surfaces: an OSError, or the RuntimeError text torch's and
    safetensors' writers wrap it in."""
    if isinstance(exc, NoSpace) or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        return True
    text = str(exc)
    return "No space left on device" in text or "file write failed" in text or "StorageFull" in text


def mount_point(path: str | Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def not_permitted(exc: PermissionError) -> str:
    """One line for a file this user may not write (a run directory shared read-only, or made
    by another account): the file, and what to do."""
    return (f"{exc.filename}: permission denied: this command writes there; run it as an account that can write "
            "the run directory, or on a copy of the run")


def no_space(path: str | Path) -> NoSpace:
    return NoSpace(f"no space left on {mount_point(path)} while writing {path}; free space and rerun")


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn running out of disk space while writing `path` into `NoSpace` naming it."""
    try:
        yield
    except NoSpace:
        raise
    except Exception as exc:
        if is_no_space(exc):
            raise no_space(path) from None
        raise
