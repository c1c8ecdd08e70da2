"""The chunked LM head + loss equals the loss on the whole logits tensor, value and gradients.

`distill.chunked.head_loss` takes each chunk's gradient in the forward pass; these tests hold it
to the plain computation (`full_head_loss`, and for every objective the loss written the
direct way from the model's full [B, L, V] logits) to 1e-5.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from distill import divergences
from distill.chunked import CrossEntropy, full_head_loss, head_loss
from distill.device import placement
from distill.distillation import IGNORE, Distiller
from distill.layout import TrainPaths
from distill.modeling import load_student, load_teacher
from distill.train_config import KDConfig, TrainConfig
from distill.training import collate, tokenize_pairs
from tests.test_training import pairs


def completion_spans(labels: torch.Tensor) -> list[tuple[int, int]]:
    """Per row, (first completion position, completion length) in the unshifted sequence."""
    spans = []
    for row in labels:
        idx = (row != IGNORE).nonzero().squeeze(-1)
        spans.append((int(idx[0]), int(idx.numel())) if idx.numel() else (0, 0))
    return spans


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ m·v / Σ m (0 when nothing is selected)."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1.0)


def test_masked_mean_excludes_unselected_positions():
    values = torch.tensor([[1.0, 100.0, 3.0]])
    assert masked_mean(values, torch.tensor([[True, False, True]])).item() == 2.0


def ce_loss(logits, rows):
    return (F.cross_entropy(logits, rows["target"], reduction="none") * rows["w"]).sum()


def kd_loss(kind, logits, rows):
    div, _ = divergences.full_kd(logits, rows["t_logits"], kind, beta=0.3, temperature=1.7)
    return ce_loss(logits, rows) + (div * rows["w"]).sum()


def topk_loss(kind, logits, rows):
    div, _ = divergences.topk_kd(logits, rows["ids"], rows["lps"], kind, beta=0.3, temperature=1.7)
    return ce_loss(logits, rows) + (div * rows["w"]).sum()


LOSSES = {
    "ce": ce_loss,
    "ce-in-place": CrossEntropy(0.37),
    **{f"kd-{k}": functools.partial(kd_loss, k) for k in ("forward_kl", "reverse_kl", "jsd")},
    **{f"topk-{k}": functools.partial(topk_loss, k) for k in ("forward_kl", "reverse_kl", "jsd")},
}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_head_loss_equals_the_full_logits_loss(name, chunk):
    torch.manual_seed(0)
    n, h, v = 37, 16, 301
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (0.3 * torch.randn(v, h)).requires_grad_()
    top = torch.randn(n, v).log_softmax(-1).topk(9, dim=-1)
    rows = {"target": torch.randint(0, v, (n,)), "w": torch.rand(n), "t_logits": torch.randn(n, v),
            "ids": top.indices, "lps": top.values}
    full = full_head_loss(hidden, weight, LOSSES[name], rows)
    g_full = torch.autograd.grad(2.5 * full, [hidden, weight])
    chunked = head_loss(hidden, weight, LOSSES[name], rows, chunk=chunk)
    g_chunked = torch.autograd.grad(2.5 * chunked, [hidden, weight])
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6, abs=1e-5)
    for a, b in zip(g_chunked, g_full, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()


def test_frozen_head_gets_no_gradient_and_the_hidden_states_still_do():
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(11, 4)  # a LoRA student's frozen head
    rows = {"target": torch.randint(0, 11, (5,)), "w": torch.ones(5)}
    head_loss(hidden, weight, ce_loss, rows, chunk=2).backward()
    assert hidden.grad is not None and weight.grad is None


# -- every objective against the loss written from the full logits ------------------------------


def reference(cfg: TrainConfig, model, teacher, batch, store, vocab: int, n_target: int, grad_accum: int):
    """The loss as it reads on paper: full [B, L, V] logits, shifted, cross-entropy plus the
    masked mean of the divergence."""
    kd = cfg.kd
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :vocab]
    s_logits, labels = logits[:, :-1], batch["labels"][:, 1:]
    ce = F.cross_entropy(s_logits.reshape(-1, vocab), labels.reshape(-1),
                         ignore_index=IGNORE, reduction="sum") / n_target
    if cfg.objective == "sft":
        return ce
    valid = labels != IGNORE
    if store is not None:
        ids = torch.zeros((*s_logits.shape[:2], kd.top_k), dtype=torch.long)
        lps = torch.zeros((*s_logits.shape[:2], kd.top_k))
        for r, (i, (s0, n)) in enumerate(zip(batch["index"], completion_spans(batch["labels"]), strict=True)):
            row_ids, row_lp = store.rows(i)
            ids[r, s0 - 1 : s0 - 1 + n], lps[r, s0 - 1 : s0 - 1 + n] = row_ids[:n].long(), row_lp[:n].float()
        div, t_ent = divergences.topk_kd(s_logits, ids, lps, kd.loss, beta=kd.beta, temperature=kd.temperature)
    else:
        with torch.no_grad():
            if "t_input_ids" in batch:
                t_all = teacher(input_ids=batch["t_input_ids"],
                                attention_mask=batch["t_attention_mask"]).logits[..., :vocab]
                t_logits = torch.zeros_like(s_logits)
                spans = zip(completion_spans(batch["labels"]), completion_spans(batch["t_labels"]), strict=True)
                for r, ((s0, n), (t0, _)) in enumerate(spans):
                    t_logits[r, s0 - 1 : s0 - 1 + n] = t_all[r, t0 - 1 : t0 - 1 + n]
            else:
                t_logits = teacher(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab]
        div, t_ent = divergences.full_kd(s_logits, t_logits, kd.loss, beta=kd.beta, temperature=kd.temperature)
    mask = valid
    if cfg.objective == "ekd":
        if kd.score == "teacher_entropy":
            scores = t_ent
        else:
            scores = divergences.entropy(F.log_softmax(s_logits.detach() / kd.temperature, dim=-1))
        mask = (divergences.bucket_mask(scores, valid, *kd.bucket) if kd.bucket is not None
                else divergences.top_fraction_mask(scores, valid, kd.top_k_percent))
    return (1 - kd.alpha) * ce + kd.alpha * masked_mean(div, mask) * kd.temperature**2 / grad_accum


REFERENCE_CASES = {
    "sft": ("sft", {}),
    "kd": ("kd", {"loss": "forward_kl"}),
    "kd-jsd-T2": ("kd", {"loss": "jsd", "beta": 0.3, "temperature": 2.0, "alpha": 0.7}),
    "kd-reverse": ("kd", {"loss": "reverse_kl"}),
    "kd-offline": ("kd", {"teacher": "offline", "top_k": 8}),
    "ekd-teacher": ("ekd", {"top_k_percent": 0.3}),
    "ekd-student": ("ekd", {"top_k_percent": 0.5, "score": "student_entropy"}),
    "ekd-bucket-offline": ("ekd", {"top_k_percent": None, "bucket": [40.0, 90.0], "teacher": "offline", "top_k": 8}),
    "context": ("context", {}),
}


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_each_objective_equals_its_full_logits_form(tiny_world, tmp_path, name):
    objective, kd = REFERENCE_CASES[name]
    cfg = TrainConfig(objective=objective, kd=KDConfig(**kd), loss_chunk=5, max_length=64)
    place = placement("fp32", "cpu")
    model, tokenizer = load_student(tiny_world.student, cfg, place)
    context = cfg.kd.context_template.format if objective == "context" else None
    examples = tokenize_pairs(tokenizer, pairs()[:6], 64,
                              teacher_prompt=(lambda p: context(prompt=p)) if context else None)
    distiller = Distiller(cfg, tokenizer, tiny_world.teacher, TrainPaths(tmp_path), examples, place)
    batch = collate(examples[1:5], tokenizer.pad_token_id, [1, 2, 3, 4])
    n_target = int((batch["labels"][:, 1:] != IGNORE).sum()) + 3  # as if another micro-batch held 3 more
    loss, ce_sum, _ = distiller.loss(model, distiller.prepare(batch), n_target, grad_accum=2)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    teacher = load_teacher(tiny_world.teacher, place) if distiller.store is None and objective != "sft" else None
    want = reference(cfg, model, teacher, batch, distiller.store, len(tokenizer), n_target, grad_accum=2)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
    for a, b in zip(grads, want_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert ce_sum.item() == pytest.approx(F.cross_entropy(
        model(input_ids=batch["input_ids"]).logits[:, :-1].reshape(-1, len(tokenizer)),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE, reduction="sum").item(), rel=1e-5)


def test_vocabulary_rows_past_the_tokenizer_are_ignored(tiny_world, tmp_path):
    """config.vocab_size pads the head (151,936 rows for 151,665 tokens): those rows never
    enter the loss, as the full-logits form slices them off."""
    cfg = TrainConfig(loss_chunk=4, max_length=64)
    place = placement("fp32", "cpu")
    model, tokenizer = load_student(tiny_world.student, cfg, place)
    model.resize_token_embeddings(len(tokenizer) + 13)
    examples = tokenize_pairs(tokenizer, pairs()[:3], 64)
    distiller = Distiller(cfg, tokenizer, None, TrainPaths(tmp_path), examples, place)
    batch = collate(examples, tokenizer.pad_token_id, [0, 1, 2])
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    loss, *_ = distiller.loss(model, distiller.prepare(batch), n, 1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.size(-1) == len(tokenizer) + 13
    want = F.cross_entropy(logits[:, :-1, : len(tokenizer)].reshape(-1, len(tokenizer)),
                           batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum") / n
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
