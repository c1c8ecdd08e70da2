"""A stage that runs as torchrun ranks (tests/test_launch.py registers it): the ranks meet,
all-reduce their ranks and say where they ran. It draws on the train stage's resources, so the
cluster profile's layout for train applies."""

from __future__ import annotations

import os
import socket

from distill.stage import FIRST, Result, Stage, Unit


def meet(unit: Unit) -> Result:
    """Join the process group torchrun set up, all-reduce, and report."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        total = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(total)
        where = [None] * dist.get_world_size()
        dist.all_gather_object(where, f"{socket.gethostname()}:{os.getpid()}:{os.environ.get('SLURM_PROCID')}")
        return Result({"metrics": {"sum": total.item(), "world": dist.get_world_size(), "where": where}})
    finally:
        dist.destroy_process_group()


RANKS = Stage("meet", meet, plans=(FIRST,), resources="train", distributed=lambda cfg: True)
