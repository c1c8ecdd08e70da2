"""An objective defined outside distill (tests/test_objective_plugin.py names it by its module
path, `train.objective: tests.toy_objective`): the CE plus alpha times the squared distance
between the student's and the teacher's log-probabilities at each completion position.
Everything an objective needs is here; no other file names it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from distill.errors import ConfigError
from distill.objectives import ChunkKind, Objective, Teacher, Trainer

if TYPE_CHECKING:
    import torch



class SquaredLogProbs(Objective):
    logit_term = True
    gpu_checks = {"toy: squared log-prob distance": {"objective": "tests.toy_objective"}}
    calls = 0  # chunks this process has computed the divergence of

    def check(self, at: Callable[..., str]) -> None:
        if self.cfg.kd.teacher != "online":
            raise ConfigError(f"{at('train.kd.teacher', 'train.objective')}: "
                              "the toy objective needs the teacher online")

    def teacher(self) -> Teacher:
        return "online"

    def alpha(self) -> float:
        return self.cfg.kd.alpha

    def chunk_kind(self) -> ChunkKind:
        return "kd"

    def describe(self) -> str:
        return f"squared log-prob distance, alpha {self.cfg.kd.alpha}"

    def divergence(self, trainer: Trainer, logits: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        SquaredLogProbs.calls += 1
        student = logits.float().log_softmax(-1)
        teacher = (rows["t_hidden"] @ trainer.t_weight.T).float().log_softmax(-1)
        return ((student - teacher) ** 2).mean(-1)


OBJECTIVE = SquaredLogProbs
