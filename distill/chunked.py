"""The LM head and the loss, a chunk of positions at a time, so that vocabulary-sized tensors
never exist for more than `chunk` positions, in the forward pass or the backward.

At a 152k-token vocabulary one float32 row of logits is 0.6 MB: 8 × 2048 positions make 9.3 GiB,
and a loss on them keeps several such tensors alive. Chunking only the loss does not help,
because autograd keeps every chunk's log-softmax until backward. Here each chunk's logits are
computed, the loss and its gradient with respect to those logits are taken at once (autograd on
that chunk alone), and the gradient goes straight through the head into the hidden states and
the head's weight. What outlives a chunk is [positions, hidden] and [vocabulary, hidden]: the
sizes of the head's own input and weight. Backward then only scales those stored gradients.
It costs the same three matrix products as the plain head and recomputes nothing (Liger's fused
linear cross-entropy works the same way, in Triton and on CUDA only; this is plain torch and
runs on any device). A loss may bring its own gradient (`value_and_grad`): cross-entropy does,
written over the logits buffer itself, so plain SFT keeps one [chunk, V] tensor alive where
autograd would keep four.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

# chunk_loss(logits [n, V] float32, per-position rows of this chunk) -> scalar (summed, weighted)
ChunkLoss = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, loss: ChunkLoss,
                rows: Mapping[str, torch.Tensor], chunk: int, dtype: torch.dtype) -> torch.Tensor:
        w = weight.detach().to(dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # float32 accumulator of the head's gradient, written by the first chunk's product
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.size(0), chunk):
            h = hidden[s : s + chunk].detach().to(dtype)
            part = {k: v[s : s + chunk] for k, v in rows.items()}
            logits = (h @ w.T).float()
            if hasattr(loss, "value_and_grad"):
                value, g = loss.value_and_grad(logits, part)  # overwrites the logits with their gradient
            else:
                with torch.enable_grad():
                    logits.requires_grad_()
                    value = loss(logits, part)
                g = torch.autograd.grad(value, logits)[0] if need_h or need_w else None
            total += value.detach()
            del logits
            if not (need_h or need_w):
                continue
            g = g.to(dtype)
            if need_h:
                grad_h[s : s + chunk] = g @ w
            if need_w:
                _accumulate(grad_w, g.T, h, first=s == 0)
        if need_w and hidden.size(0) == 0:
            grad_w.zero_()
        # Kept as attributes, not saved tensors, so backward can scale them in place and hand
        # them over without a copy.
        ctx.grad_h, ctx.grad_w, ctx.weight_dtype = grad_h, grad_w, weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grad_h, grad_w = ctx.grad_h, ctx.grad_w
        ctx.grad_h = ctx.grad_w = None
        if grad_h is not None:
            grad_h.mul_(grad_out)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


class CrossEntropy:
    """`weight` × the summed cross-entropy of a chunk's positions (rows["target"]), adding the
    unweighted sum to `ce_sum` (for the log). `value_and_grad` writes the gradient, weight ×
    (softmax − one-hot), over the logits buffer: no other [chunk, V] tensor is made."""

    def __init__(self, weight: float, ce_sum: torch.Tensor | None = None) -> None:
        self.weight, self.ce_sum = weight, ce_sum

    def __call__(self, logits: torch.Tensor, rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy(logits, rows["target"], reduction="sum")
        if self.ce_sum is not None:
            self.ce_sum += ce.detach()
        return ce * self.weight

    def value_and_grad(self, logits: torch.Tensor,
                       rows: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        target = rows["target"]
        picked = logits.gather(-1, target[:, None]).squeeze(-1)
        top = logits.max(-1, keepdim=True).values
        probs = logits.sub_(top).exp_()  # in place: exp(x - max)
        total = probs.sum(-1, keepdim=True)
        ce = (top + total.log()).squeeze(-1) - picked
        if self.ce_sum is not None:
            self.ce_sum += ce.sum()
        grad = probs.div_(total)
        grad[torch.arange(grad.size(0), device=grad.device), target] -= 1.0
        return ce.sum() * self.weight, grad.mul_(self.weight)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc (float32) = a @ b on the first chunk, += a @ b after; in place where the dtypes allow."""
    if a.dtype == acc.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
    elif first:
        acc.copy_(a @ b)
    else:
        acc += a @ b


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, loss: ChunkLoss, rows: Mapping[str, torch.Tensor],
              *, chunk: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`loss` summed over the chunks of `hidden` [N, H] passed through the head `weight` [V, H].

    `rows` holds per-position tensors (targets, weights, teacher rows), each cut to the chunk
    before `loss` sees it. `dtype` is the precision of the head's matrix product (the autocast
    dtype under mixed precision); the loss itself is always taken in float32.
    """
    return _HeadLoss.apply(hidden, weight, loss, rows, chunk, dtype or hidden.dtype)


def full_head_loss(hidden: torch.Tensor, weight: torch.Tensor, loss: ChunkLoss, rows: Mapping[str, torch.Tensor],
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """The same loss with the whole [N, V] logits tensor materialised: the reference that
    `head_loss` must equal, and what it replaces."""
    dtype = dtype or hidden.dtype
    return loss((hidden.to(dtype) @ weight.to(dtype).T).float(), rows)
