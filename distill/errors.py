"""Errors that reach the user as one line, naming the file and the place."""

from __future__ import annotations

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
