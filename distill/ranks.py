"""Training as several processes, one per GPU, started by torchrun: which examples are this
process's, the sums every process has to agree on, and the DDP or FSDP wrapping of the student.

A step on N ranks consumes exactly the batch one process would: every micro-batch of the step
(`micro_batch_indices`) is cut into N contiguous parts, one per rank. The loss is normalised as
in one process, by counts over the whole micro-batch or step (`n_target`, the divergence's
positions), each summed over the ranks; so rank r's loss is its own share of the single-process
loss, and the shares add up to it. DDP and FSDP *average* gradients over the ranks, so each rank
backpropagates `world x` its share: the average of those is the sum of the shares, the gradient
one process would have computed (exact for a power-of-two world, to rounding otherwise). The
same factor on every rank and every parameter keeps this one line in the loop, with no
communication hook of DDP's or divide factor of FSDP's to keep in step with it.

A micro-batch with fewer examples than ranks (the last of an epoch) leaves some ranks without
any: such a rank runs one example of it uncounted (weight 0), because DDP and FSDP need every
rank in every forward and backward.

Without torchrun (no RANK in the environment) a job is one process, whatever
`train.distributed` says; `fsdp` still writes its checkpoints with torch.distributed.checkpoint,
so a later allocation under torchrun, at any world size, resumes from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from distill.errors import DistillError
from distill.modeling import decoder

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes. The default is the one process of a
    job that is not distributed: every collective below is then the identity."""

    rank: int = 0
    world: int = 1
    mode: str = "none"  # train.distributed
    group: bool = False  # a process group was joined: collectives communicate
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (nccl needs the GPU)
    pid: int = field(default_factory=os.getpid)  # rank 0's process id, which names temporary directories

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Checkpoints are written by every rank with torch.distributed.checkpoint."""
        return self.mode == "fsdp"

    def part(self, indices: list[int]) -> tuple[list[int], bool]:
        """This rank's contiguous part of a micro-batch, and whether it counts: a rank left without
        examples gets the first one, to be run with weight 0."""
        lo, hi = len(indices) * self.rank // self.world, len(indices) * (self.rank + 1) // self.world
        return (indices[lo:hi], True) if hi > lo else (indices[:1], False)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the ranks (in place; the tensor is returned)."""
        if self.group:
            dist.all_reduce(t)
        return t

    def total(self, n: int) -> int:
        return int(self.sum(torch.tensor(n, dtype=torch.int64, device=self.device)).item()) if self.group else n

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a stop request, a failure)."""
        if not self.group:
            return flag
        t = torch.tensor(int(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.group:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if not self.group:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def together(self, work: Callable[[], None]) -> None:
        """`work` on this rank, then agreement on whether it succeeded everywhere: a failure on any
        rank raises on every rank, so none waits in a collective for one that gave up."""
        try:
            work()
        except Exception:
            self.any(True)
            raise
        if self.any(False):
            raise DistillError(f"rank {self.rank}: another training process failed (its own error is in its log)")


    def first(self, work: Callable[[], T]) -> T:
        """`work` on rank 0, then on the others (they read what rank 0 wrote); a failure on rank 0
        raises on every rank."""
        done: list[T] = []
        self.together(lambda: done.append(work()) if self.main else None)
        return done[0] if self.main else work()


def exit_rank(code: int) -> NoReturn:
    """End a torchrun rank's process without the interpreter's finalization, once its work is
    saved and its process group destroyed: gloo's worker threads can still hold finished work
    whose tensors reference Python objects, and freeing those while the interpreter is torn
    down aborts the process now and then (SIGABRT, "terminate called without an active
    exception"), which torchrun reports as the rank failing."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


@contextlib.contextmanager
def join(mode: str, device: torch.device) -> Iterator[Ranks]:
    """This process's `Ranks`. Under torchrun (RANK and WORLD_SIZE set) with `mode` ddp or fsdp,
    the process group is joined (nccl on CUDA, gloo on the CPU) and left again at the end, unless
    the caller had joined it already."""
    if "RANK" not in os.environ:
        if mode != "none":
            log.info("train.distributed: %s, but not started by torchrun: training as one process", mode)
        yield Ranks(mode=mode, device=device)
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none":
        if world > 1:
            raise DistillError(f"train.distributed: none, but this process is rank {os.environ['RANK']} of "
                               f"WORLD_SIZE={world} (torchrun): set train.distributed: ddp or fsdp, "
                               "or start one process")
        yield Ranks(device=device)
        return
    joined = not dist.is_initialized()
    if joined:
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    finished = False
    try:
        ranks = Ranks(dist.get_rank(), dist.get_world_size(), mode, group=True, device=device)
        yield dataclasses.replace(ranks, pid=ranks.broadcast(os.getpid()))
        finished = True
    finally:
        if joined:
            if finished:
                # No rank leaves while another still communicates (rank 0 saving the final
                # model): gloo aborts a process whose group goes away under it.
                dist.barrier()
            dist.destroy_process_group()


class StudentLoss(torch.nn.Module):
    """The student with the loss as its forward: the module DDP and FSDP wrap. The loss runs the
    student's decoder and reads its LM head's weight itself (`Distiller.loss`), never the
    student's own forward, so the wrapper's forward has to be the loss for their hooks (DDP's
    gradient reduction, FSDP's all-gathers) to run. The distiller, and the teacher it holds,
    stay outside the module: nothing of the teacher's is replicated, sharded or synchronised."""

    def __init__(self, student: torch.nn.Module, distiller: Any) -> None:
        super().__init__()
        self.student = student
        self.distiller = distiller

    def forward(self, batch: dict[str, Any], n_target: int, grad_accum: int,
                counted: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.distiller.loss(self.student, batch, n_target, grad_accum, counted=counted)


def wrap(student: torch.nn.Module, distiller: Any, ranks: Ranks) -> torch.nn.Module:
    """The module a training step calls: `StudentLoss`, inside DDP (ddp), or sharded with FSDP2
    per decoder layer and at the root (fsdp). Build the optimizer after this: FSDP replaces the
    parameters with sharded ones."""
    net = StudentLoss(student, distiller)
    if not ranks.group:
        return net
    if ranks.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(net, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    # What is initialised at random (LoRA adapters) starts as rank 0's everywhere, as DDP does.
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
    for layer in decoder(student).layers:
        fully_shard(layer)
    fully_shard(net)
    return net


def accumulating(net: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP reduces gradients once per step, in the backward of its last micro-batch (FSDP
    reduce-scatters every micro-batch's, which keeps only a shard of them in memory)."""
    if last or not hasattr(net, "no_sync"):
        return contextlib.nullcontext()
    return net.no_sync()


# -- sharded state (fsdp) ------------------------------------------------------------------------


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Trainable parameters only, as the single-process checkpoints hold (a LoRA base is reloaded).
    return StateDictOptions(ignore_frozen_params=True, **kw)


def save_sharded(path: Path, student: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the student and the optimizer into `path` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(student, optimizer, options=_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)


def load_sharded(path: Path, student: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read what `save_sharded` wrote, resharded to this world size (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(student, optimizer, options=_options())
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    # Not strict: the frozen parameters are left out on purpose (dcp.load has already refused a
    # checkpoint that lacks any of the trainable ones).
    set_state_dict(student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(strict=False))


def gathered(student: torch.nn.Module, ranks: Ranks, plain: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
    """The sharded student gathered into one plain model on rank 0's host (`plain()` loads the
    student there to receive the weights; collective, None on the other ranks); the student
    itself when nothing is sharded."""
    if not (ranks.group and ranks.sharded):
        return student
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ranks.main:
        return None
    model = plain()
    names = set(model.state_dict())
    model.load_state_dict({k: v for k, v in full.items() if k in names}, strict=True)
    return model
