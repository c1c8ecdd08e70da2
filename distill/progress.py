"""Progress bars that suit both a terminal and a batch log."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress_bar(**kwargs: Any) -> tqdm:
    """A tqdm bar on stderr. In a SLURM log (stderr not a terminal) it redraws at most every
    30 s: each redraw is a new line there, and a bar updated per step would fill the log."""
    kwargs.setdefault("file", sys.stderr)
    if not kwargs["file"].isatty():
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(**kwargs)
