"""`context`: context distillation. The divergence of `kd`, where the teacher reads the student's
completion after a prompt of its own (`train.kd.context_template`, the student's prompt in its
`{prompt}` slot): the student learns to answer without the instructions the teacher was given."""

from __future__ import annotations

from collections.abc import Callable

from distill.errors import ConfigError
from distill.objectives import Teacher
from distill.objectives.kd import KD


class Context(KD):
    presets = {"context": ["train.objective=context"]}
    gpu_checks = {"context": {"objective": "context"}}

    def check(self, at: Callable[..., str]) -> None:
        if self.cfg.kd.teacher == "offline":
            raise ConfigError(f"{at('train.kd.teacher', 'train.objective')}: "
                              "context distillation needs the teacher online")

    def teacher(self) -> Teacher:
        return "online"

    def teacher_prompt(self, prompt: str) -> str | None:
        return self.cfg.kd.context_template.format(prompt=prompt)


OBJECTIVE = Context
