"""`kd`: logit distillation. The CE plus alpha · T² · a divergence (forward KL, reverse KL or
generalised JSD, `distill.divergences`) between the teacher's distribution and the student's,
averaged over every completion position. The teacher is in memory (`train.kd.teacher: online`,
full vocabulary) or its top-k logprobs were stored once before the first step (`offline`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from distill.objectives import ChunkKind, Objective, Teacher, Trainer

if TYPE_CHECKING:
    import torch



class KD(Objective):
    logit_term = True
    presets = {
        "kd": ["train.objective=kd"],
        "kd-reverse": ["train.objective=kd", "train.kd.loss=reverse_kl"],
        "kd-jsd": ["train.objective=kd", "train.kd.loss=jsd", "train.kd.beta=0.5"],
        "kd-offline": ["train.objective=kd", "train.kd.teacher=offline", "train.kd.top_k=20"],
        "kd-offline-64": ["train.objective=kd", "train.kd.teacher=offline", "train.kd.top_k=64"],
    }
    gpu_checks = {
        "kd forward_kl online": {"objective": "kd"},
        "kd jsd online, T 2": {"objective": "kd", "kd": {"loss": "jsd", "temperature": 2.0}},
        "kd offline top-20": {"objective": "kd", "kd": {"teacher": "offline", "top_k": 20}},
    }

    def teacher(self) -> Teacher:
        return self.cfg.kd.teacher

    def alpha(self) -> float:
        return self.cfg.kd.alpha

    def logit_weight(self) -> float:
        # T² keeps the gradient's scale from shrinking with the temperature.
        return self.cfg.kd.alpha * self.cfg.kd.temperature**2

    def chunk_kind(self) -> ChunkKind:
        return "kd_offline" if self.teacher() == "offline" else "kd"

    def describe(self) -> str:
        kd = self.cfg.kd
        what = f"{kd.loss}{f' beta {kd.beta}' if kd.loss == 'jsd' else ''}, T {kd.temperature}, alpha {kd.alpha}"
        return what + (f", offline top-{kd.top_k}" if kd.teacher == "offline" else "")

    def divergence(self, trainer: Trainer, logits: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        from distill import divergences

        kd = self.cfg.kd
        if "t_ids" in rows:
            return divergences.topk_kd(logits, rows["t_ids"], rows["t_logprobs"], kd.loss, beta=kd.beta,
                                       temperature=kd.temperature)[0]
        t_logits = rows["t_hidden"] @ trainer.t_weight.T  # both in the compute dtype already
        return divergences.full_kd(logits, t_logits, kd.loss, beta=kd.beta, temperature=kd.temperature)[0]


OBJECTIVE = KD
