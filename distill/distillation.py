"""The teacher side of training: what each objective adds to the student's cross-entropy.

`Distiller` is built once per training run from `train.objective` and gives the training loop
one function, `loss(model, batch)`. For `sft` it is plain cross-entropy. `kd`, `ekd` and
`context` add a divergence to the teacher's distribution at the completion positions: from the
teacher in memory (online), or from its top-k logprobs captured once before the first step and
stored beside the checkpoints (offline), so a requeued job does not run the teacher again.
`feature` matches hidden states through learned projections, which are trained and
checkpointed with the student (they live on the model as `distill_projections` until the final
save removes them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from distill import objectives
from distill.config import TrainConfig
from distill.errors import DistillError

IGNORE = -100
PROJECTIONS = "distill_projections"


def check_same_vocabulary(student_tokenizer: Any, teacher_path: str | Path) -> None:
    """Logit distillation compares distributions token by token: both models must use one
    tokenizer. Compared on the real vocabularies, not `config.vocab_size` (padded rows differ)."""
    from transformers import AutoTokenizer

    teacher_vocab = AutoTokenizer.from_pretrained(str(teacher_path)).get_vocab()
    student_vocab = student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()))[:1]
        raise DistillError(
            f"{teacher_path}: the teacher's tokenizer differs from the student's ({len(teacher_vocab)} vs "
            f"{len(student_vocab)} tokens; first difference {differing}): logit and context distillation need "
            "one vocabulary; use objective sft (or feature) for this pair"
        )


def completion_spans(labels: torch.Tensor) -> list[tuple[int, int]]:
    """Per row, (first completion position, completion length) in the unshifted sequence."""
    spans = []
    for row in labels:
        idx = (row != IGNORE).nonzero().squeeze(-1)
        spans.append((int(idx[0]), int(idx.numel())) if idx.numel() else (0, 0))
    return spans


@dataclass
class TopKStore:
    """Teacher top-k logprobs for every completion token of the training set: example i owns
    rows offsets[i]:offsets[i+1] of `ids` (int32) and `logprobs` (float16)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    offsets: torch.Tensor

    def rows(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.logprobs[a:b]

    def save(self, path: Path, meta: dict[str, str]) -> None:
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        save_file({"ids": self.ids, "logprobs": self.logprobs, "offsets": self.offsets}, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> tuple[TopKStore, dict[str, str]]:
        with safe_open(str(path), framework="pt") as f:
            return cls(f.get_tensor("ids"), f.get_tensor("logprobs"), f.get_tensor("offsets")), f.metadata()

    def bytes_per_token(self) -> float:
        n = max(1, self.ids.size(0))
        return (self.ids.numel() * self.ids.element_size() + self.logprobs.numel() * self.logprobs.element_size()) / n


def capture_topk(teacher: Any, examples: list[dict[str, list[int]]], k: int, vocab: int, batch_size: int = 16) -> TopKStore:
    """Run the teacher once over the training examples; keep the top-k logprobs (at T = 1) of
    each completion token's prediction."""
    ids, logprobs, offsets = [], [], [0]
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            chunk = examples[s : s + batch_size]
            width = max(len(e["input_ids"]) for e in chunk)
            inp = torch.zeros((len(chunk), width), dtype=torch.long)
            att = torch.zeros_like(inp)
            for r, e in enumerate(chunk):
                inp[r, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
                att[r, : len(e["input_ids"])] = 1
            logits = teacher(input_ids=inp, attention_mask=att).logits[..., :vocab]
            for r, e in enumerate(chunk):
                first = next(i for i, lab in enumerate(e["labels"]) if lab != IGNORE)
                pred = logits[r, first - 1 : len(e["input_ids"]) - 1].float().log_softmax(-1)
                top = pred.topk(k, dim=-1)
                ids.append(top.indices.to(torch.int32))
                logprobs.append(top.values.to(torch.float16))
                offsets.append(offsets[-1] + pred.size(0))
    return TopKStore(torch.cat(ids), torch.cat(logprobs), torch.tensor(offsets, dtype=torch.int64))


class Distiller:
    """The loss of one training run, given its objective."""

    def __init__(self, cfg: TrainConfig, tokenizer: Any, teacher_path: str | Path | None, out_dir: Path,
                 examples: list[dict[str, list[int]]]) -> None:
        self.cfg, self.kd, self.objective = cfg, cfg.kd, cfg.objective
        self.vocab = len(tokenizer)
        self.teacher = None
        self.store: TopKStore | None = None
        if self.objective == "sft":
            return
        if teacher_path is None:
            raise DistillError(f"train.objective {self.objective} needs a teacher (models.teacher)")
        if self.objective != "feature":
            check_same_vocabulary(tokenizer, teacher_path)
        if self.objective in ("kd", "ekd") and self.kd.teacher == "offline":
            self.store = self._offline_store(teacher_path, out_dir, examples)
        else:
            self.teacher = _load_teacher(teacher_path)

    def _offline_store(self, teacher_path: str | Path, out_dir: Path, examples: list[dict]) -> TopKStore:
        path = out_dir / f"teacher-top{self.kd.top_k}.safetensors"
        meta = {"teacher": str(teacher_path), "k": str(self.kd.top_k), "examples": str(len(examples)),
                "tokens": str(sum(sum(1 for lab in e["labels"] if lab != IGNORE) for e in examples))}
        if path.exists():
            store, saved = TopKStore.load(path)
            if saved == meta:
                return store
        store = capture_topk(_load_teacher(teacher_path), examples, self.kd.top_k, self.vocab)
        store.save(path, meta)
        (out_dir / "teacher-topk.json").write_text(json.dumps(
            {**meta, "bytes_per_token": round(store.bytes_per_token(), 1), "file_bytes": path.stat().st_size}, indent=1))
        return store

    def attach_projections(self, model: torch.nn.Module) -> None:
        """Feature distillation: one linear map per layer pair, student width -> teacher width,
        registered on the model so the optimizer and the checkpoints include it."""
        if self.objective != "feature":
            return
        sw, tw = model.config.hidden_size, self.teacher.config.hidden_size
        torch.manual_seed(self.cfg.seed)
        projections = torch.nn.ModuleList(torch.nn.Linear(sw, tw) for _ in self.cfg.feature.layers)
        model.add_module(PROJECTIONS, projections)

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], n_target: int, grad_accum: int) -> tuple[torch.Tensor, float]:
        """(loss to backpropagate, summed CE for the log) of one micro-batch."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch.get("position_ids"), output_hidden_states=self.objective == "feature")
        logits = out.logits[..., : self.vocab]
        ce_sum = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), batch["labels"][:, 1:].reshape(-1),
                                 ignore_index=IGNORE, reduction="sum")
        ce = ce_sum / max(n_target, 1)
        if self.objective == "sft":
            return ce, ce_sum.item()
        if self.objective == "feature":
            alpha, extra = self.cfg.feature.alpha, self._feature_loss(model, out.hidden_states, batch)
        else:
            alpha, extra = self.kd.alpha, self._kd_loss(logits, batch)
        return (1 - alpha) * ce + alpha * extra / grad_accum, ce_sum.item()

    def _kd_loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        kd = self.kd
        s_logits = logits[:, :-1]
        valid = batch["labels"][:, 1:] != IGNORE
        if self.store is not None:
            t_ids, t_lp = self._stored_rows(batch, s_logits.shape[:2])
            div, t_ent = objectives.topk_kd(s_logits, t_ids, t_lp, kd.loss, beta=kd.beta, temperature=kd.temperature, chunk=kd.chunk)
        else:
            t_logits = self._teacher_logits(batch, s_logits.shape[:2])
            div, t_ent = objectives.full_kd(s_logits, t_logits, kd.loss, beta=kd.beta, temperature=kd.temperature, chunk=kd.chunk)
        mask = valid
        if self.objective == "ekd":
            scores = t_ent if kd.score == "teacher_entropy" else objectives.student_entropy(s_logits, kd.temperature, kd.chunk)
            if kd.bucket is not None:
                mask = objectives.bucket_mask(scores, valid, kd.bucket[0], kd.bucket[1])
            else:
                mask = objectives.top_fraction_mask(scores, valid, kd.top_k_percent)
        return objectives.masked_mean(div, mask) * kd.temperature**2

    def _teacher_logits(self, batch: dict[str, Any], shape: torch.Size) -> torch.Tensor:
        """The teacher's logits placed at the student's (shifted) completion positions."""
        with torch.no_grad():
            if "t_input_ids" not in batch:
                return self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, : self.vocab]
            t_logits = self.teacher(input_ids=batch["t_input_ids"], attention_mask=batch["t_attention_mask"]).logits[..., : self.vocab]
        aligned = torch.zeros((*shape, self.vocab), dtype=t_logits.dtype)
        for r, ((s0, n), (t0, _)) in enumerate(zip(completion_spans(batch["labels"]), completion_spans(batch["t_labels"]), strict=True)):
            aligned[r, s0 - 1 : s0 - 1 + n] = t_logits[r, t0 - 1 : t0 - 1 + n]
        return aligned

    def _stored_rows(self, batch: dict[str, Any], shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.kd.top_k
        ids = torch.zeros((*shape, k), dtype=torch.long)
        lps = torch.zeros((*shape, k), dtype=torch.float32)
        for r, (i, (s0, n)) in enumerate(zip(batch["index"], completion_spans(batch["labels"]), strict=True)):
            row_ids, row_lp = self.store.rows(i)
            ids[r, s0 - 1 : s0 - 1 + n] = row_ids[:n].long()
            lps[r, s0 - 1 : s0 - 1 + n] = row_lp[:n].float()
        return ids, lps

    def _feature_loss(self, model: torch.nn.Module, hidden: tuple[torch.Tensor, ...], batch: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            t_hidden = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    output_hidden_states=True).hidden_states
        mask = (batch["labels"] != IGNORE).unsqueeze(-1).float()
        projections = getattr(model, PROJECTIONS)
        total = torch.zeros(())
        for proj, (si, ti) in zip(projections, self.cfg.feature.layers, strict=True):
            mapped, target = proj(hidden[si]), t_hidden[ti].float()
            if self.cfg.feature.loss == "mse":
                per_pos = ((mapped - target) ** 2).mean(-1, keepdim=True)
            else:
                per_pos = 1 - F.cosine_similarity(mapped, target, dim=-1).unsqueeze(-1)
            total = total + (per_pos * mask).sum() / mask.sum().clamp(min=1.0)
        return total / len(projections)


def _load_teacher(path: str | Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher
