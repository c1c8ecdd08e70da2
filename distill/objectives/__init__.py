"""Distillation objectives as components: one module per objective, picked by `train.objective`.

Every module of this package is an objective named after its file (`kd.py` is `kd`) and defines
`OBJECTIVE`, a subclass of `Objective`. `train.objective` may also name a module outside distill
by its dotted path (`mylab.rkd`); it is imported the same way in every process that loads the
config, so a job started by SLURM finds it too. Adding an objective is one file: the training
loop, the config check, the memory planner, `distill compare` and `gpu-check` ask the
objective, never its name.

Modules here import torch inside the methods that train, not at the top: the driver on a login
node loads configs (and so these classes) without paying for torch.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from distill.errors import DistillError

if TYPE_CHECKING:
    import torch

    from distill.device import Placement
    from distill.train_config import TrainConfig

# The label of a position that is no target (prompt and padding): it carries no loss.
IGNORE = -100
Teacher = Literal["none", "online", "offline"]
# Loss-chunk working sets the planner knows (distill.memory.CHUNK_BUFFERS): cross-entropy alone,
# against the teacher's full-vocabulary logits, or against its stored top-k.
ChunkKind = Literal["ce", "kd", "kd_offline"]


class Trainer(Protocol):
    """What an objective may use of the trainer that runs it (`distill.distillation.Distiller`)."""

    teacher: Any  # the teacher model, when it is online
    t_weight: torch.Tensor  # its LM head on the student's device, cut to the student's vocabulary
    place: Placement
    student: torch.nn.Module  # the student being trained (not wrapped for several ranks)
    tokenizer: Any  # the student's
    examples: list[dict[str, list[int]]]  # the training set, tokenized
    # Indices of the examples whose prompts draws lean toward (UNDO's mined errors), and the share
    # of draws that go to them.
    focus: tuple[list[int], float]

    def map_head(self, hidden: torch.Tensor, weight: torch.Tensor,
                 fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`fn` of the float32 logits of `hidden` a chunk of rows at a time, concatenated."""
        ...

    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over the ranks of a multi-process run (itself on one process)."""
        ...

    def policy_engine(self, kv_cache_gib: float) -> Any:
        """A vLLM engine that samples from the student's current weights (`sync`, `sample`)."""
        ...


class Objective:
    """What an objective adds to the student's cross-entropy, and what it needs for it.

    The loss of a micro-batch is (1 - alpha) · CE + alpha · term. The term is either a
    per-position divergence from the teacher's distribution at the completion positions
    (`divergence`, averaged over the positions `select` keeps and scaled by T²), computed a
    chunk of positions at a time beside the CE, or a loss over whole hidden states
    (`extra_loss`), or both. Everything else the trainer does (loading the teacher, the stored
    top-k, the chunked head, several ranks) is the same for every objective.
    """

    # `distill compare` presets: name -> `--set` overrides (the objective's own name included).
    presets: ClassVar[dict[str, list[str]]] = {}
    # `gpu-check` rows: label -> `train` settings (a mapping as in a config file).
    gpu_checks: ClassVar[dict[str, dict[str, Any]]] = {}
    # The loss reads every hidden state of the student and the teacher (the planner counts them).
    hidden_states: ClassVar[bool] = False
    # Micro-batches may be packed into rows of several examples (`train.packing`).
    packs: ClassVar[bool] = False
    # A per-position divergence from the teacher's logits joins the CE.
    logit_term: ClassVar[bool] = False

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    # -- before any job starts ------------------------------------------------------------------

    def check(self, at: Callable[..., str]) -> None:
        """Refuse settings that cannot work: a ConfigError naming the key through `at(key, ...)`."""

    def teacher(self) -> Teacher:
        """Whether training needs the teacher: not at all, in memory, or as stored top-k."""
        return "none"

    def alpha(self) -> float:
        """The weight of the teacher term (the CE gets 1 - alpha)."""
        return 0.0

    def batch_alpha(self, batch: dict[str, Any]) -> float:
        """The teacher term's weight in one micro-batch (the same in every one, unless the
        objective draws micro-batches of different kinds)."""
        return self.alpha()

    def logit_weight(self) -> float:
        """What the averaged divergence is multiplied by (alpha, and T² for a temperature)."""
        return self.alpha()

    def chunk_kind(self) -> ChunkKind:
        return "ce"

    def describe(self) -> str:
        """The settings that matter, in a few words (the `compare` table's column)."""
        return ""

    # -- training -------------------------------------------------------------------------------

    def teacher_prompt(self, prompt: str) -> str | None:
        """The teacher's own prompt for an example, when it reads a different one (None: the same)."""
        return None

    def attach(self, model: torch.nn.Module, trainer: Trainer) -> None:
        """Add trainable parts to the student (they are optimised and checkpointed with it)."""

    def resample(self, trainer: Trainer, examples: list[dict[str, list[int]]], indices: list[int], step: int,
                 micro: int) -> list[dict[str, list[int]]]:
        """The examples micro-batch `micro` of optimizer step `step` trains on, from those of the
        training set at `indices` (the verified rationales, unchanged here). Whatever it draws
        must depend on (seed, step, micro, index) alone, so a resumed run and any number of ranks
        train on the same tokens."""
        return examples

    def draws_examples(self) -> bool:
        """Whether `resample` draws examples of its own (so `undo.onpolicy_errors` may steer it)."""
        return type(self).resample is not Objective.resample

    def select(self, trainer: Trainer, batch: dict[str, Any], rows: dict[str, torch.Tensor],
               hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """1.0 at the target positions the divergence is averaged over (all of them here)."""
        import torch

        return torch.ones(hidden.size(0), dtype=torch.float32, device=hidden.device)

    def divergence(self, trainer: Trainer, logits: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per position of one chunk: the divergence from the teacher (when `logit_term`)."""
        raise NotImplementedError

    def extra_loss(self, trainer: Trainer, model: torch.nn.Module, hidden_states: tuple[torch.Tensor, ...],
                   batch: dict[str, Any], grad_accum: int, counted: bool) -> torch.Tensor | None:
        """A loss over the student's hidden states (`hidden_states`), weighted by alpha and
        divided by `grad_accum` like the rest of the micro-batch's loss (None: no such loss)."""
        return None


def names() -> list[str]:
    """The objectives distill ships: the modules of this package, by name."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str) -> type[Objective]:
    """The objective called `name`: a module of this package, or a dotted module path."""
    if "." not in name and name not in names():
        raise DistillError(f"expected one of {', '.join(names())} (or a module path that defines OBJECTIVE), "
                           f"got {name!r}")
    path = name if "." in name else f"{__name__}.{name}"
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name is None or not path.startswith(exc.name):
            raise
        raise DistillError(f"no module {path!r} to import the objective from") from None
    found = getattr(module, "OBJECTIVE", None)
    if not (isinstance(found, type) and issubclass(found, Objective)):
        raise DistillError(f"{module.__name__} defines no OBJECTIVE (an Objective subclass)")
    return found


def build(cfg: TrainConfig) -> Objective:
    """The objective of a training config."""
    return get(cfg.objective)(cfg)


def presets() -> dict[str, list[str]]:
    """Every shipped objective's `compare` presets, in name order."""
    return {preset: sets for name in names() for preset, sets in get(name).presets.items()}
