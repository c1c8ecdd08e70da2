"""One rank of a distributed unit, as torchrun starts it (`python -m jobs.rank <unit file>`;
the srun task that started torchrun wrote the file, see jobs.launch)."""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

from distill.runner import leads
from jobs.allocation import set_threads
from jobs.stoppable import WITH_SIGTERM, run_stoppable


def main(argv: list[str] | None = None) -> int:
    """One rank of a distributed unit (started by torchrun; see jobs.launch)."""
    parser = argparse.ArgumentParser(prog="python -m jobs.rank", description=main.__doc__)
    parser.add_argument("unit", type=Path, help="the unit file its srun task wrote (jobs.launch.write_unit)")
    args = parser.parse_args(argv)
    with open(args.unit, "rb") as f:
        cfg, it, stage, key = pickle.load(f)
    set_threads(None)
    outcome, _ = run_stoppable(cfg, it, stage, key, signums=WITH_SIGTERM, progress=leads())
    if outcome.state == "failed":
        print(f"error: {stage.describe(key)}: {outcome.error}", file=sys.stderr)
    # A stop at a safe point is not a failure: torchrun would report it as one, with a traceback,
    # on every requeue. The task reads the outcome from the manifest, not from this status.
    return 1 if outcome.state == "failed" else 0


if __name__ == "__main__":
    from distill.ranks import exit_rank

    exit_rank(main())
