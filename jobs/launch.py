"""A distributed unit inside its SLURM job: every srun task runs torchrun, and the ranks meet
on the job's first host (c10d rendezvous), as open-r1's `slurm/train.slurm` and TRL's
multi-node recipe launch them.

The job has `nodes` x `tasks_per_node` srun tasks (submitit starts this callable in each; on
the plain sbatch path, slurm/common.sh starts `python -m jobs.sbatch` in each); each task starts
`torchrun --nnodes <tasks> --nproc_per_node <gpus_per_node> --rdzv_backend c10d
--rdzv_endpoint <first host>:<port>`, whose ranks run the unit (`python -m jobs.rank <unit
file>`: the config and stage the task handed over).
Rank 0 keeps the manifest (`distill.runner`); the task of global rank 0 reads the outcome when
its ranks have ended and, for a unit stopped by the time limit or a preemption, hands over to
submitit's requeue like any other unit (or exits 3 for the sbatch script's requeue). The stop
signal SLURM sends a task is forwarded to its ranks (torchrun runs in a session of its own, its
agent ignoring the signal), and the ranks agree on the step to stop at (`distill.training`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from distill.config import RunConfig
from distill.layout import RunPaths
from distill.runner import Outcome, manifest_of, unit_entry
from distill.stage import Stage
from jobs.allocation import first_task, gpus_on_node, job_id, step_tasks
from jobs.signals import STOP_SIGNAL, StopOnSignal


@dataclass(frozen=True)
class RankLayout:
    """How a distributed unit's processes are laid out in its job."""

    tasks: int  # srun tasks in the job: torchrun's --nnodes
    procs: int  # processes per task (one per GPU): --nproc_per_node

    @property
    def world(self) -> int:
        return self.tasks * self.procs


def ranks_for(cfg: RunConfig, stage: Stage, nodes: int, tasks_per_node: int,
              gpus_per_node: int | None) -> RankLayout | None:
    """The layout of `stage`'s job, or None where it runs as one process (not distributed, or a
    world of one)."""
    if not stage.runs_distributed(cfg):
        return None
    ranks = RankLayout(nodes * tasks_per_node, gpus_per_node or 1)
    return ranks if ranks.world > 1 else None


def ranks_in_step(cfg: RunConfig, stage: Stage) -> RankLayout | None:
    """The layout of `stage` in the srun step this process is a task of (slurm/common.sh starts
    one task a node): torchrun on every task, a process a GPU of its node; None: one process."""
    return ranks_for(cfg, stage, step_tasks(), 1, gpus_on_node())


def first_host() -> str:
    """The job's first host, where the rendezvous store lives (MASTER_ADDR in torchrun's terms)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
    hosts = out.stdout.split()
    return hosts[0] if out.returncode == 0 and hosts else os.environ.get("SLURMD_NODENAME", "localhost")


def rendezvous_port(job: str) -> int:
    """A port per job, so two distributed jobs that share a first host do not meet each other."""
    digits = "".join(ch for ch in job.split("_")[0] if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def torchrun_command(ranks: RankLayout, unit_file: Path, job: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(ranks.tasks),
            "--nproc_per_node", str(ranks.procs), "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"{first_host()}:{rendezvous_port(job)}", "--rdzv_id", job.split("_")[0],
            "-m", "jobs.rank", str(unit_file)]


def write_unit(cfg: RunConfig, it: int, stage: Stage, key: str, job: str) -> Path:
    """The unit as the driver handed it over (its config with every override, the stage object),
    for the ranks to load: one file per job and srun task, in the run's logs."""
    import cloudpickle

    path = RunPaths(cfg.run_dir).logs / f"{job}.{os.environ.get('SLURM_PROCID', '0')}.unit.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cloudpickle.dumps((cfg, it, stage, key)))  # read only by the ranks started after
    return path


def _agent_ignores_stop() -> None:
    signal.signal(STOP_SIGNAL, signal.SIG_IGN)  # the ranks set their own handler


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's ranks: each in a session of its own, so
    no process-group signal reaches them)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


def signal_ranks(agent: int, signum: int) -> None:
    for pid in children(agent):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def run_ranks(command: list[str], stop: StopOnSignal) -> int:
    """Run torchrun and wait. A stop signal this task receives goes on to every rank (the agent
    ignores it, and the ranks agree on the step to stop at); SLURM may also signal the ranks
    itself, and a rank stops once however many signals come."""
    proc = subprocess.Popen(command, preexec_fn=_agent_ignores_stop)
    stop.forward = lambda signum: signal_ranks(proc.pid, signum)
    if stop.received is not None:  # came before the ranks existed
        signal_ranks(proc.pid, stop.received)
    return proc.wait()


def run_distributed(cfg: RunConfig, it: int, stage: Stage, key: str, ranks: RankLayout,
                    stop: StopOnSignal) -> Outcome | None:
    """Run the unit's ranks from this srun task. The task of global rank 0 returns the unit's
    outcome as rank 0 recorded it in the manifest (a rank's own exit status does not come
    through torchrun); the others return None: rank 0's task reports for the job."""
    job = job_id() or "0"
    run_ranks(torchrun_command(ranks, write_unit(cfg, it, stage, key, job), job), stop)
    if not first_task():
        return None
    entry = unit_entry(manifest_of(cfg).read(), it, stage, key)
    state = entry.get("state", "pending")
    return Outcome({"done": "done", "pending": "stopped"}.get(state, "failed"), entry,
                   entry.get("error") or f"its ranks ended with the unit {state}")
