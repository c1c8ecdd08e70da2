"""What SLURM (or the local executor) gave this job: its id and its CPUs."""

from __future__ import annotations

import os

import submitit


def job_id() -> str | None:
    """`123` or `123_4` (array task) inside a SLURM or submitit job, else None."""
    try:
        return submitit.JobEnvironment().job_id
    except RuntimeError:  # not a submitit job: a plain sbatch script, a test, an in-process run
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        if array:
            return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
        return os.environ.get("SLURM_JOB_ID")


def step_tasks() -> int:
    """The srun tasks of this job step (--ntasks, or --nodes x --ntasks-per-node, when the batch
    script starts the stage with srun); 1 in the batch script itself and outside SLURM."""
    return int(os.environ.get("SLURM_STEP_NUM_TASKS") or 1)


def first_task() -> bool:
    """Whether this is task 0 of its srun step (the batch script, and any process outside
    SLURM, count as task 0): the one that speaks for a job of several tasks."""
    return os.environ.get("SLURM_PROCID", "0") == "0"


def gpus_on_node() -> int | None:
    """The GPUs this job has on this node (--gres=gpu:N, --gpus-per-node), None without any."""
    return int(os.environ.get("SLURM_GPUS_ON_NODE") or 0) or None


def set_threads(threads: int | None) -> None:
    """One torch thread per CPU the job was given, not per CPU on the node: with SLURM's default
    of no CPU binding, two array tasks on one node would each start a thread per core, and
    oversubscribed OpenMP threads slow generation down many times over. torchrun's ranks share
    their srun task's CPUs (LOCAL_WORLD_SIZE: its ranks on this node)."""
    import torch

    cpus = allocated_cpus()
    n = threads or (max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE") or 1)) if cpus else 0)
    if n > 0:
        torch.set_num_threads(n)


def allocated_cpus() -> int:
    """CPUs of this SLURM job on this node (--cpus-per-task, else the allocation); 0 outside SLURM."""
    per_task = os.environ.get("SLURM_CPUS_PER_TASK")
    if per_task:
        return int(per_task)
    per_node = os.environ.get("SLURM_JOB_CPUS_PER_NODE", "")  # e.g. "2" or "4(x2)"
    digits = per_node.split("(")[0].split(",")[0]
    return int(digits) if digits.isdigit() else 0
