"""`feature`: hidden-state matching. Each `[student layer, teacher layer]` pair of
`train.feature.layers` maps the student's hidden states to the teacher's width through a linear
projection learned with the student, and the loss is their MSE or cosine distance at the
completion positions, weighted by `train.feature.alpha` beside the CE. The projections live on
the model as `distill_projections`, so they are optimised and checkpointed with it; the final
save removes them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from distill.errors import ConfigError
from distill.objectives import IGNORE, Objective, Teacher, Trainer

if TYPE_CHECKING:
    import torch



class Feature(Objective):
    presets = {"feature": ["train.objective=feature"]}
    gpu_checks = {"feature": {"objective": "feature"}}
    hidden_states = True

    def check(self, at: Callable[..., str]) -> None:
        layers = self.cfg.feature.layers
        if not layers:
            raise ConfigError(f"{at('train.feature.layers')}: give at least one [student, teacher] pair")
        for i, pair in enumerate(layers):
            if len(pair) != 2:
                raise ConfigError(f"{at('train.feature.layers')}[{i}]: expected a [student, teacher] pair, got {pair}")

    def teacher(self) -> Teacher:
        return "online"

    def alpha(self) -> float:
        return self.cfg.feature.alpha

    def describe(self) -> str:
        f = self.cfg.feature
        return f"{f.loss} on layers {f.layers}, alpha {f.alpha}"

    def attach(self, model: torch.nn.Module, trainer: Trainer) -> None:
        """One linear map per layer pair, student width -> teacher width, on the model's device
        in float32."""
        import torch

        from distill.modeling import PROJECTIONS

        sw, tw = model.config.hidden_size, trainer.teacher.config.hidden_size
        torch.manual_seed(self.cfg.seed)
        projections = torch.nn.ModuleList(torch.nn.Linear(sw, tw) for _ in self.cfg.feature.layers)
        model.add_module(PROJECTIONS, projections.to(trainer.place.device))

    def extra_loss(self, trainer: Trainer, model: torch.nn.Module, hidden_states: tuple[torch.Tensor, ...],
                   batch: dict[str, Any], grad_accum: int, counted: bool) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        from distill.modeling import PROJECTIONS, decoder

        with torch.no_grad():
            t_hidden = decoder(trainer.teacher)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                output_hidden_states=True, use_cache=False).hidden_states
        mask = (batch["labels"] != IGNORE).unsqueeze(-1).float()
        n_positions = trainer.sum_over_ranks(mask.sum() if counted else mask.new_zeros(())).clamp(min=1.0)
        projections = getattr(model, PROJECTIONS)
        total = torch.zeros((), dtype=torch.float32, device=mask.device)
        for proj, (si, ti) in zip(projections, self.cfg.feature.layers, strict=True):
            mapped, target = proj(hidden_states[si]).float(), t_hidden[ti].to(mask.device).float()
            if self.cfg.feature.loss == "mse":
                per_pos = ((mapped - target) ** 2).mean(-1, keepdim=True)
            else:
                per_pos = 1 - F.cosine_similarity(mapped, target, dim=-1).unsqueeze(-1)
            total = total + (per_pos * mask).sum() / n_positions
        return self.alpha() * (total / len(projections)) / grad_accum


OBJECTIVE = Feature
