"""Distillation losses per token position: KL in both directions, generalised JSD, top-k KD
from stored teacher logprobs, and the entropy masks of entropy-guided KD.

Conventions (p = teacher, q = student, per position, over the last dimension):
forward KL = Σ p log(p/q); reverse KL = Σ q log(q/p); generalised JSD (TRL's GKD) with
M = βp + (1-β)q is β·KL(p‖M) + (1-β)·KL(q‖M), where β = 0 is taken as forward KL and β = 1 as
reverse KL (the formula itself degenerates to 0 there). Temperature T divides both sides'
logits and the KD term is multiplied by T² so its gradient scale does not shrink with T.

These are pure functions of logits over the last dimension; `distill.chunked` feeds them one
chunk of positions at a time, so the vocabulary-sized tensors they create stay small.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


def divergence(p_log: torch.Tensor, q_log: torch.Tensor, kind: Divergence, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between log-distributions over the same support (last dim)."""
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        return (p_log.exp() * (p_log - q_log)).sum(-1)
    if kind == "reverse_kl":
        return (q_log.exp() * (q_log - p_log)).sum(-1)
    if kind == "jsd":
        m_log = torch.logsumexp(torch.stack([p_log + math.log(beta), q_log + math.log(1 - beta)]), dim=0)
        return beta * (p_log.exp() * (p_log - m_log)).sum(-1) + (1 - beta) * (q_log.exp() * (q_log - m_log)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}")


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    return -(log_probs.exp() * log_probs).sum(-1)


def full_kd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: Divergence, *,
    beta: float = 0.5, temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(divergence, teacher entropy) per position, full vocabulary on both sides, in float32.
    The teacher side carries no gradient. Any leading shape: [N, V] or [B, L, V]."""
    q_log = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p_log = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return divergence(p_log, q_log, kind, beta), entropy(p_log)


def topk_kd(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, kind: Divergence, *,
    beta: float = 0.5, temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(divergence, teacher entropy) per position from the teacher's stored top-k.

    The teacher's k logprobs (taken at T = 1) are divided by T and renormalised over the k ids:
    the tail mass outside the top-k is dropped, not spread. Forward KL gathers the student's
    log-softmax over the full vocabulary at the teacher's ids, so probability the student puts
    elsewhere is still penalised through the normaliser; reverse KL and JSD need the student as a
    distribution on the same support, so they renormalise it over the k ids. With k equal to the
    vocabulary size all three equal `full_kd`.
    """
    p_log = F.log_softmax(teacher_logprobs.float() / temperature, dim=-1)
    q_log = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_ids.long())
    if kind != "forward_kl":
        q_log = q_log - torch.logsumexp(q_log, dim=-1, keepdim=True)
    return divergence(p_log, q_log, kind, beta), entropy(p_log)


def top_fraction_mask(scores: torch.Tensor, valid: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per row, the ⌈fraction·L⌉ valid positions with the highest score (L = valid positions
    of that row); ties go to the earlier position. Whole-tensor operations, no per-row loop,
    so it stays on the device without a host round trip."""
    ranked = scores.float().masked_fill(~valid, float("-inf"))
    rank = _rank_of(torch.sort(ranked, dim=-1, descending=True, stable=True).indices)
    keep = torch.ceil(fraction * valid.sum(-1, keepdim=True).to(torch.float64))
    return valid & (rank < keep)


def _rank_of(order: torch.Tensor) -> torch.Tensor:
    """Each position's place in `order` (the indices a sort returned), as a tensor of their shape."""
    positions = torch.arange(order.size(-1), device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def bucket_mask(scores: torch.Tensor, valid: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """Per row, the valid positions whose score percentile lies in [lower, upper): a position of
    ascending rank r among L valid ones is at percentile 100·r/L."""
    ranked = scores.float().masked_fill(~valid, float("inf"))
    rank = _rank_of(torch.sort(ranked, dim=-1, stable=True).indices)
    pct = rank.to(torch.float64) * 100.0 / valid.sum(-1, keepdim=True).clamp(min=1).to(torch.float64)
    return valid & (pct >= lower) & (pct < upper)
