"""Cluster profiles: where and with what resources the SLURM jobs of each stage run.

A profile (`configs/cluster/*.yaml`) is checked like a run config, by the same machinery as run
configs (`distill.typed_yaml`), so a typo fails on the login node with one line
(`configs/cluster/pace.yaml: stages.train.cpus: expected int, got 'four'`) instead of in the queue.
Values still to be filled in are written `<like this>` and refused until they are.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill import pipeline
from distill.errors import ConfigError
from distill.memory import DEFAULT_GPU_GB, Gpu, gpu_of, parse_gres
from distill.typed_yaml import check_one_line, check_sbatch_token, from_mapping, read_yaml_mapping

PROFILE_DIR = Path("configs/cluster")
PLACEHOLDER = re.compile(r"<[^<>]+>")
MEM = re.compile(r"^\d+[KMGT]?B?$")


@dataclass
class StageResources:
    """One stage's resources; a key left out keeps the profile's top-level value."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gres: str | None = None
    cpus: int | None = None
    mem: str | None = None
    time_min: int | None = None
    # A distributed stage (train with `train.distributed: ddp|fsdp`): one SLURM job of `nodes`
    # nodes with `tasks_per_node` srun tasks each (1 on a real cluster), every task running
    # torchrun with `gpus_per_node` processes (one per GPU; 1 without GPUs).
    nodes: int | None = None
    tasks_per_node: int | None = None
    gpus_per_node: int | None = None


@dataclass
class ClusterProfile:
    """sbatch settings shared by every job, with per-stage overrides under `stages`."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    # Generic resources as sbatch --gres takes them, e.g. gpu:H100:1.
    gres: str | None = None
    cpus: int = 1
    # sbatch --mem, e.g. 32G; unset: the partition's default.
    mem: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1
    # Processes per srun task of a distributed stage, one per GPU; unset: 1, and no GPU request
    # beyond `gres`.
    gpus_per_node: int | None = None
    # Wall-clock limit per allocation (sbatch --time, minutes). A stage that needs longer is
    # checkpointed and requeued, at most `max_num_timeout` times.
    time_min: int = 24 * 60
    # At most this many tasks of one array run at once (the `%` in --array=0-7%4).
    array_parallelism: int = 16
    # USR2 comes this many seconds before the time limit (--signal=USR2@N): time to stop at a
    # safe point and save.
    signal_delay_s: int = 90
    # Requeues after a timeout before the job fails (preemptions are not counted).
    max_num_timeout: int = 3
    # Shell lines run before the job's Python starts: module loads, conda activate.
    setup: list[str] = field(default_factory=list)
    # Per-stage resources, e.g. GPUs for generation and evaluation, CPUs only for verify; keyed by
    # the stages' resource sections (the one-shot baseline's stages use `train` and `evaluate`).
    stages: dict[str, StageResources] = field(default_factory=dict)
    source: str = field(default="", metadata={"internal": True})

    def resources(self, stage: str) -> StageResources:
        """The resolved resources of a stage's jobs: by the stage's name (`baseline_train` draws
        on `train`) or its resource section."""
        base = StageResources(**{f.name: getattr(self, f.name) for f in dataclasses.fields(StageResources)})
        section = pipeline.stage(stage).resource_section if stage in pipeline.names() else stage
        override = self.stages.get(section)
        if override is None:
            return base
        changes = {k: v for k, v in dataclasses.asdict(override).items() if v is not None}
        return dataclasses.replace(base, **changes)

    def key_of(self, stage: str, name: str) -> str:
        """The profile key that sets resource `name` of `stage`'s jobs: `stages.<section>.<name>`
        where the section overrides it, else the top-level `<name>`."""
        section = pipeline.stage(stage).resource_section if stage in pipeline.names() else stage
        override = self.stages.get(section)
        return f"stages.{section}.{name}" if override is not None and getattr(override, name) is not None else name

    def executor_parameters(self, stage: str) -> dict[str, Any]:
        """`AutoExecutor.update_parameters` keywords for the jobs of `stage`."""
        r = self.resources(stage)
        params = {
            "timeout_min": r.time_min,
            "cpus_per_task": r.cpus,
            "slurm_partition": r.partition,
            "slurm_account": r.account,
            "slurm_qos": r.qos,
            "slurm_gres": r.gres,
            "slurm_mem": r.mem,
            "slurm_setup": list(self.setup) or None,
            "slurm_signal_delay_s": self.signal_delay_s,
            "slurm_array_parallelism": self.array_parallelism,
            "nodes": r.nodes if r.nodes != 1 else None,
            "tasks_per_node": r.tasks_per_node if r.tasks_per_node != 1 else None,
            # The GPU count rides on gres when it names one (gpu:H100:4), else --gpus-per-node.
            "gpus_per_node": r.gpus_per_node if r.gpus_per_node and not r.gres else None,
        }
        return {k: v for k, v in params.items() if v is not None}


def resolve_profile_path(name_or_path: str | Path) -> Path:
    """A path as given, or a bare name such as `pace` for `configs/cluster/pace.yaml`."""
    path = Path(name_or_path)
    if not path.exists() and path.suffix == "" and len(path.parts) == 1:
        candidate = PROFILE_DIR / f"{path}.yaml"
        if candidate.exists():
            return candidate
    return path


def load_profile(name_or_path: str | Path, *, filled: bool = True) -> ClusterProfile:
    """The profile, checked; `filled` False lets values still to be filled in (`<like this>`)
    pass, for `distill plan`, which reads only what GPUs each stage's jobs get."""
    path = resolve_profile_path(name_or_path)
    known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))) if PROFILE_DIR.is_dir() else ""
    raw = read_yaml_mapping(path, "cluster profile", f" (profiles in {PROFILE_DIR}: {known})" if known else "")
    profile = from_mapping(ClusterProfile, raw, f"{path}: ")
    profile.source = str(path)
    _check_values(profile, filled)
    return profile


def _check_values(p: ClusterProfile, filled: bool = True) -> None:
    where = p.source
    known = pipeline.resource_sections()
    for name in p.stages:
        if name not in known:
            raise ConfigError(f"{where}: stages.{name}: unknown key (expected one of: {', '.join(known)})")
    sections: list[tuple[str, Any]] = [("", p)]
    sections += [(f"stages.{name}.", resources) for name, resources in p.stages.items()]
    for prefix, section in sections:
        if section is None:
            continue
        for f in dataclasses.fields(StageResources):
            value = getattr(section, f.name)
            key = f"{prefix}{f.name}"
            if isinstance(value, str) and PLACEHOLDER.search(value):
                if filled:
                    raise ConfigError(f"{where}: {key}: fill in {PLACEHOLDER.search(value).group(0)} in {value!r}")
                continue
            if isinstance(value, str):
                check_sbatch_token(value, f"{where}: {key}")
            if f.name in ("cpus", "time_min", "nodes", "tasks_per_node", "gpus_per_node") and value is not None \
                    and value < 1:
                raise ConfigError(f"{where}: {key}: must be >= 1, got {value}")
            if f.name == "mem" and value is not None and not MEM.match(value):
                raise ConfigError(f"{where}: {key}: expected a size like 32G or 4000M, got {value!r}")
    for i, line in enumerate(p.setup):
        check_one_line(line, f"{where}: setup[{i}]")
        if PLACEHOLDER.search(line) and filled:
            raise ConfigError(f"{where}: setup[{i}]: fill in {PLACEHOLDER.search(line).group(0)} in {line!r}")
    ranked = pipeline.distributed_sections()
    for prefix, section in sections:
        if section is None or prefix in ("", *(f"stages.{s}." for s in ranked)):
            continue
        if (section.nodes or 1) * (section.tasks_per_node or 1) > 1:
            key = "nodes" if (section.nodes or 1) > 1 else "tasks_per_node"
            which = f"the {ranked[0]} stage runs" if len(ranked) == 1 else f"the stages {', '.join(ranked)} run"
            raise ConfigError(f"{where}: {prefix}{key}: only {which} on several nodes or tasks (torchrun ranks); "
                              "other stages scale by shards")
    for name in known:
        r = p.resources(name)
        count = parse_gres(r.gres)[1]  # gpu:a100 is one GPU, as sbatch reads it
        if count and r.gpus_per_node is not None and count != r.gpus_per_node:
            raise ConfigError(f"{where}: {p.key_of(name, 'gpus_per_node')}: {r.gpus_per_node} processes per node, but "
                              f"{p.key_of(name, 'gres')} asks for {count} GPU(s) ({r.gres}); make them agree")
    if p.array_parallelism < 1:
        raise ConfigError(f"{where}: array_parallelism: must be >= 1, got {p.array_parallelism}")
    if p.max_num_timeout < 0:
        raise ConfigError(f"{where}: max_num_timeout: must be >= 0, got {p.max_num_timeout}")
    shortest = min(p.resources(name).time_min for name in known)
    if not 0 <= p.signal_delay_s < shortest * 60:
        raise ConfigError(
            f"{where}: signal_delay_s: must be >= 0 and below the shortest time limit "
            f"({shortest} min), got {p.signal_delay_s}"
        )


def section_gpus(profile: ClusterProfile, sections: Sequence[str]) -> tuple[dict[str, Gpu | None], list[str]]:
    """The GPU each resource section's jobs get under the profile (None: no GPU in their gres),
    and notes on what was assumed: for `distill plan` and the driver's memory check alike."""
    gpus: dict[str, Gpu | None] = {}
    notes: list[str] = []
    for section in sections:
        gres, key = profile.resources(section).gres, profile.key_of(section, "gres")
        gpus[section], more = gpu_of(gres, profile.source, key)
        if gpus[section] is None:
            more = [f"{profile.source}: {key}: {'no GPU in ' + repr(gres) if gres else 'not set'}; "
                    f"assumed {DEFAULT_GPU_GB} GB"]
        notes += [n for n in more if n not in notes]
    return gpus, notes


def profile_world(profile: ClusterProfile) -> int | None:
    """The GPUs a distributed stage's job has in all (gpus_per_node × nodes), None where the
    profile does not set gpus_per_node."""
    for section in pipeline.distributed_sections():
        r = profile.resources(section)
        if r.gpus_per_node:
            return r.gpus_per_node * (r.nodes or 1)
    return None
