"""`ekd`: entropy-guided KD. The divergence of `kd`, averaged over the completion positions
where the entropy is highest (`train.kd.top_k_percent` of each sequence) or between two entropy
percentiles (`train.kd.bucket`); the entropy is the teacher's or the student's (`kd.score`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from distill.errors import ConfigError
from distill.objectives import IGNORE, Trainer
from distill.objectives.kd import KD

if TYPE_CHECKING:
    import torch



class EKD(KD):
    presets = {
        "ekd": ["train.objective=ekd", "train.kd.top_k_percent=0.2"],
        "ekd-bucket": ["train.objective=ekd", "train.kd.top_k_percent=null", "train.kd.bucket=[70, 80]"],
    }
    gpu_checks = {"ekd top 20% by teacher entropy": {"objective": "ekd", "kd": {"top_k_percent": 0.2}}}

    def check(self, at: Callable[..., str]) -> None:
        kd = self.cfg.kd
        if (kd.top_k_percent is None) == (kd.bucket is None):
            raise ConfigError(f"{at('train.kd', 'train.objective')}: ekd needs exactly one of top_k_percent and bucket")
        if kd.bucket is not None and not (len(kd.bucket) == 2 and 0 <= kd.bucket[0] < kd.bucket[1] <= 100):
            raise ConfigError(f"{at('train.kd.bucket')}: expected [lower, upper] percentiles, "
                              f"0 <= lower < upper <= 100, got {kd.bucket}")

    def describe(self) -> str:
        kd = self.cfg.kd
        which = f"bucket {kd.bucket}" if kd.bucket else f"top {kd.top_k_percent:.0%}"
        return f"{super().describe()}, {which} by {kd.score}"

    def select(self, trainer: Trainer, batch: dict[str, Any], rows: dict[str, torch.Tensor],
               hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The entropy-selected positions, scored in a gradient-free pass over the chunks."""
        import torch

        from distill import divergences

        kd = self.cfg.kd

        def entropy(logits: torch.Tensor) -> torch.Tensor:
            return divergences.entropy((logits / kd.temperature).log_softmax(-1))

        with torch.no_grad():
            if kd.score == "student_entropy":
                scores = trainer.map_head(hidden, weight, entropy)
            elif "t_ids" in rows:
                scores = divergences.entropy((rows["t_logprobs"].float() / kd.temperature).log_softmax(-1))
            else:
                scores = trainer.map_head(rows["t_hidden"], trainer.t_weight, entropy)
            labels = batch["labels"]
            grid = torch.zeros(labels[:, 1:].numel(), dtype=torch.float32, device=hidden.device)
            grid = grid.index_copy(0, batch["positions"], scores).view(labels.size(0), -1)
            valid = labels[:, 1:] != IGNORE
            if kd.bucket is not None:
                mask = divergences.bucket_mask(grid, valid, kd.bucket[0], kd.bucket[1])
            else:
                mask = divergences.top_fraction_mask(grid, valid, kd.top_k_percent)
            return mask.reshape(-1).index_select(0, batch["positions"]).float()


OBJECTIVE = EKD
