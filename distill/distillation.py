"""The loss of a training run: the student's cross-entropy and what its objective adds to it.

`Distiller` is built once per training run from `train.objective` (`distill.objectives`) and
gives the training loop two functions: `prepare(batch)`, host-side bookkeeping of a collated
micro-batch (which positions carry a target, the stored teacher rows that go with them), and
`loss(model, batch)` on the model's device. It holds what every objective shares: the teacher
in memory (online), or its top-k logprobs captured once before the first step and stored beside
the checkpoints (offline), so a requeued job does not run the teacher again; and the chunked
head. The objective says what it needs and adds its term.

Only completion positions reach the LM head, and the head runs together with the loss a chunk
of positions at a time (`distill.chunked`), for the teacher's head too: no [batch, length,
vocabulary] tensor is ever built.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from distill import objectives
from distill.chunked import CrossEntropy, head_loss
from distill.device import Placement
from distill.errors import DistillError
from distill.jsonl import sha256_file
from distill.layout import TrainPaths
from distill.modeling import decoder, load_teacher, output_head
from distill.objectives import IGNORE
from distill.ranks import Ranks
from distill.topk_store import FORMAT, TopKStore, gap_codes, offsets_of
from distill.train_config import TrainConfig

log = logging.getLogger(__name__)


def vocabulary_relation(student_tokenizer: Any, teacher_tokenizer: Any) -> str:
    """`same`, `prefix` (every student token has the same id in the teacher's vocabulary, which
    only adds tokens after them, as Qwen3's does over Qwen2.5's) or `different`. Compared on the
    real vocabularies, not `config.vocab_size` (padded rows differ)."""
    student, teacher = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student == teacher:
        return "same"
    if (all(teacher.get(token) == i for token, i in student.items())
            and all(i >= len(student) for t, i in teacher.items() if t not in student)):
        return "prefix"
    return "different"


def check_vocabularies(student_tokenizer: Any, teacher_path: str | Path, objective: str) -> None:
    """Logit, context and feature distillation compare the two models position by position on
    the student's token ids: the teacher must read those ids as the same tokens."""
    from transformers import AutoTokenizer

    teacher_tokenizer = AutoTokenizer.from_pretrained(str(teacher_path))
    if vocabulary_relation(student_tokenizer, teacher_tokenizer) == "different":
        s, t = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        differing = sorted(set(t.items()) ^ set(s.items()))[:1]
        raise DistillError(
            f"{teacher_path}: the teacher's tokenizer differs from the student's ({len(t)} vs {len(s)} tokens; "
            f"first difference {differing}): objective {objective} needs the student's vocabulary to be the "
            "teacher's or an id-preserving prefix of it; use objective sft for this pair"
        )


def examples_digest(examples: list[dict[str, list[int]]]) -> str:
    """The sha256 of the training examples' token ids and labels: a stored top-k belongs to
    exactly these tokens."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e["input_ids"], e["labels"]]).encode())
    return digest.hexdigest()


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into [rows × (length - 1)] of the positions whose next token is a target,
    in row-major order (host side, so the device never waits on a data-dependent shape)."""
    return (labels[:, 1:].reshape(-1) != IGNORE).nonzero().squeeze(-1)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device` (copies overlap with compute where the device allows)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _padded(examples: list[dict[str, list[int]]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    inp = torch.zeros((len(examples), width), dtype=torch.long)
    att = torch.zeros_like(inp)
    for r, e in enumerate(examples):
        inp[r, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        att[r, : len(e["input_ids"])] = 1
    return inp.to(device), att.to(device)


def teacher_topk(teacher: Any, examples: list[dict[str, list[int]]], k: int, vocab: int, *, batch_size: int = 16,
                 chunk: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Run the teacher over the training examples, on its own device and in its own dtype: per
    batch of examples, the top-k ids (int32) and float32 logprobs (at T = 1) of each completion
    token's prediction, and each example's number of completion tokens. Only completion positions
    go through the head, `chunk` at a time."""
    device = output_head(teacher).weight.device
    weight = output_head(teacher).weight[:vocab]
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            part = examples[s : s + batch_size]
            inp, att = _padded(part, device)
            hidden = decoder(teacher)(input_ids=inp, attention_mask=att).last_hidden_state
            labels = torch.full(inp.shape, IGNORE, dtype=torch.long)
            for r, e in enumerate(part):
                labels[r, : len(e["labels"])] = torch.tensor(e["labels"])
            flat = hidden[:, :-1].reshape(-1, hidden.size(-1))
            rows = flat.index_select(0, target_positions(labels).to(flat.device)).to(weight.device)
            tops = [(rows[c : c + chunk] @ weight.T).float().log_softmax(-1).topk(k, dim=-1)
                    for c in range(0, rows.size(0), chunk)]
            ids = torch.cat([torch.zeros(0, k, dtype=torch.int32)] + [t.indices.to(torch.int32).cpu() for t in tops])
            logprobs = torch.cat([torch.zeros(0, k)] + [t.values.cpu() for t in tops])
            yield ids, logprobs, [sum(1 for lab in e["labels"] if lab != IGNORE) for e in part]


def capture_topk(teacher: Any, examples: list[dict[str, list[int]]], k: int, vocab: int, *, batch_size: int = 16,
                 chunk: int = 256) -> TopKStore:
    """The teacher's top-k over the training examples (`teacher_topk`), coded as they are stored
    (`distill.topk_store`)."""
    ids, codes, counts = [torch.zeros(0, k, dtype=torch.int32)], [torch.zeros(0, k - 1, dtype=torch.uint8)], []
    for top_ids, logprobs, part in teacher_topk(teacher, examples, k, vocab, batch_size=batch_size, chunk=chunk):
        ids.append(top_ids)
        codes.append(gap_codes(logprobs))
        counts += part
    return TopKStore.encode(torch.cat(ids), torch.cat(codes), offsets_of(counts))


def stored_topk(path: Path, examples: list[dict[str, list[int]]], k: int) -> TopKStore:
    """The score stage's store, once it is known to hold these very examples' tokens."""
    store, meta = TopKStore.load(path)
    if meta.get("examples_sha256") != examples_digest(examples) or store.k != k:
        raise DistillError(f"{path}: scored top-{store.k} over other tokens than the {len(examples)} examples training "
                           f"reads (top-{k}): the training set, tokenizer or train.max_length changed after the score "
                           "stage ran; run the score stage again (delete this file and rerun the iteration)")
    return store


class Distiller:
    """The loss of one training run: the student's cross-entropy and what its objective adds
    (`distill.objectives`), on whatever teacher the objective needs."""

    def __init__(self, cfg: TrainConfig, tokenizer: Any, teacher_path: str | Path | None, out: TrainPaths,
                 examples: list[dict[str, list[int]]], place: Placement, attn_implementation: str = "sdpa",
                 ranks: Ranks | None = None, topk_store: Path | None = None,
                 focus: tuple[list[int], float] | None = None) -> None:
        self.cfg, self.place, self.tokenizer = cfg, place, tokenizer
        self.student: Any = None  # set by `attach`
        self.examples = examples
        self.focus = focus or ([], 0.0)  # the examples draws lean toward (`training.Focus`), and their share
        self._engine: Any = None  # the vLLM engine following the student, once an objective asks for it
        self.objective = objectives.build(cfg)
        self.ranks = ranks or Ranks()
        self.vocab = len(tokenizer)
        self.teacher: Any = None
        self.store: TopKStore | None = None
        needs = self.objective.teacher()
        if needs == "none":
            return
        if teacher_path is None:
            raise DistillError(f"train.objective {cfg.objective} needs a teacher (models.teacher)")
        check_vocabularies(tokenizer, teacher_path, cfg.objective)
        if needs == "offline" and topk_store is not None:  # scored by the score stage
            self.store = stored_topk(topk_store, examples, cfg.kd.top_k)
        elif needs == "offline":
            # Rank 0 captures the store (or finds it), the others then load what it wrote.
            self.store = self.ranks.first(lambda: self._offline_store(teacher_path, out, examples, attn_implementation))
        else:
            # One teacher per rank, on the rank's own GPU (never spread over the node's GPUs, which
            # the other ranks use).
            self.teacher = load_teacher(teacher_path, place, attn_implementation, spread=self.ranks.world == 1)
            # The teacher's head on the student's device, cut to the student's vocabulary: a
            # teacher with extra tokens (an id-preserving superset) has them ignored.
            self.t_weight = output_head(self.teacher).weight[: self.vocab].to(place.device)

    def _offline_store(self, teacher_path: str | Path, out: TrainPaths, examples: list[dict], attn: str) -> TopKStore:
        top_k = self.cfg.kd.top_k
        path = out.topk(top_k)
        meta = {"teacher": str(teacher_path), "k": str(top_k), "examples": str(len(examples)),
                "tokens": str(sum(sum(1 for lab in e["labels"] if lab != IGNORE) for e in examples)), "format": FORMAT}
        if path.exists():
            saved = TopKStore.metadata(path)
            info = json.loads(out.topk_info.read_text()) if out.topk_info.exists() else {}
            if {k: saved.get(k) for k in meta} == meta and info.get("sha256") == sha256_file(path):
                return TopKStore.load(path)[0]
            log.warning("%s: written for other settings, or damaged (sha256 differs from %s): captured again",
                        path, out.topk_info.name)
        teacher = load_teacher(teacher_path, self.place, attn, spread=self.ranks.world == 1)
        store = capture_topk(teacher, examples, top_k, self.vocab, batch_size=self.cfg.batch_size,
                             chunk=self.cfg.loss_chunk)
        del teacher
        store.save(path, meta)
        out.topk_info.write_text(json.dumps(
            {**meta, "bytes_per_token": round(path.stat().st_size / max(1, store.tokens), 1),
             "file_bytes": path.stat().st_size,
             "sha256": sha256_file(path)}, indent=1))
        return store

    def attach(self, model: torch.nn.Module) -> None:
        """The objective's trainable parts, on the model before the optimizer sees it."""
        self.student = model
        self.objective.attach(model, self)

    def teacher_term(self, loss: float, ce_part: float) -> dict[str, float]:
        """For the curves: what the objective adds to its share of the cross-entropy (`ce_part`,
        the step's weighted CE): the teacher's term, and any extra loss, where it learns from one."""
        if self.objective.teacher() == "none":
            return {}
        return {"teacher_term": round(loss - ce_part, 6)}

    # -- host side ---------------------------------------------------------------------------

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Add the target positions (and the teacher's rows at them) to a collated batch."""
        positions = target_positions(batch["labels"])
        out = {**batch, "positions": positions, "targets": batch["labels"][:, 1:].reshape(-1)[positions]}
        if "t_labels" in batch:
            out["t_positions"] = target_positions(batch["t_labels"])
        if self.store is not None:
            counts = (batch["labels"][:, 1:] != IGNORE).sum(1).tolist()
            rows = [self.store.rows(i) for i in batch["index"]]
            out["t_ids"] = torch.cat([ids[:n] for (ids, _), n in zip(rows, counts, strict=True)]).long()
            out["t_logprobs"] = torch.cat([lp[:n] for (_, lp), n in zip(rows, counts, strict=True)]).float()
        return out

    # -- device side -------------------------------------------------------------------------

    def loss(self, model: Any, batch: dict[str, Any], n_target: int, grad_accum: int,
             counted: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, summed cross-entropy and the CE's share of the loss, for the
        log) of one prepared micro-batch already on the model's device; `n_target` counts the
        targets of the whole step.

        On several ranks the batch is this rank's part of the micro-batch: the averages over the
        micro-batch (the divergence's, the objective's own) divide by counts summed over the
        ranks, so the parts' losses add up to the whole one's. A part that is not `counted` (a
        rank left without examples runs one, see distill.ranks) adds 0 to the loss and to the counts."""
        obj = self.objective
        out = decoder(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch.get("position_ids"), output_hidden_states=obj.hidden_states,
                             use_cache=False)
        hidden = _rows(out.last_hidden_state, batch["positions"])
        weight = output_head(model).weight[: self.vocab]
        alpha = obj.batch_alpha(batch)
        rows: dict[str, torch.Tensor] = {"target": batch["targets"]}
        if obj.logit_term:
            rows |= self._teacher_rows(batch)
            selected = obj.select(self, batch, rows, hidden.detach(), weight.detach())
            n_selected = self.ranks.sum(selected.sum() if counted else selected.new_zeros(()))
            rows["kd_weight"] = obj.logit_weight() * selected / n_selected.clamp(min=1.0) / grad_accum
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce = CrossEntropy((1 - alpha) / max(n_target, 1), ce_sum)
        chunk_loss = functools.partial(self._chunk_loss, ce=ce) if "kd_weight" in rows else ce
        loss = head_loss(hidden, weight, chunk_loss, rows, chunk=self.cfg.loss_chunk, dtype=self.place.dtype)
        extra = obj.extra_loss(self, model, out.hidden_states, batch, grad_accum, counted)
        if extra is not None:
            loss = loss + extra
        ce_part = ce_sum.detach() * ce.weight
        if not counted:
            return loss * 0.0, ce_sum * 0.0, ce_part * 0.0
        return loss, ce_sum, ce_part

    def _chunk_loss(self, logits: torch.Tensor, rows: dict[str, torch.Tensor], *, ce: CrossEntropy) -> torch.Tensor:
        """The loss of one chunk of positions: weighted cross-entropy plus the weighted divergence."""
        div = self.objective.divergence(self, logits, rows)
        return ce(logits, rows) + (div * rows["kd_weight"]).sum()

    def _teacher_rows(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The teacher's side at the student's target positions: its stored top-k, or its last
        hidden states (its head runs per chunk, with the loss)."""
        if self.store is not None:
            return {"t_ids": batch["t_ids"], "t_logprobs": batch["t_logprobs"]}
        with torch.no_grad():
            if "t_input_ids" in batch:  # the teacher reads its own prompt (context distillation)
                out = decoder(self.teacher)(input_ids=batch["t_input_ids"], attention_mask=batch["t_attention_mask"],
                                            use_cache=False)
                hidden = _rows(out.last_hidden_state, batch["t_positions"].to(out.last_hidden_state.device))
            else:
                out = decoder(self.teacher)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                            use_cache=False)
                hidden = _rows(out.last_hidden_state, batch["positions"].to(out.last_hidden_state.device))
        return {"t_hidden": hidden.to(self.place.device)}

    def policy_engine(self, kv_cache_gib: float) -> Any:
        """A vLLM engine holding a copy of the student (`distill.policy_sampling`), built on first use."""
        if self._engine is None:
            from distill.policy_sampling import VLLMSampler

            self._engine = VLLMSampler(self.student, self.place.precision, kv_cache_gib)
        return self._engine

    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        return self.ranks.sum(value)

    def map_head(self, hidden: torch.Tensor, weight: torch.Tensor, fn: Any) -> torch.Tensor:
        """`fn` of each chunk's float32 logits, concatenated (no gradient)."""
        dtype, chunk = self.place.dtype, self.cfg.loss_chunk
        w = weight.to(dtype)
        return torch.cat([fn((hidden[s : s + chunk].to(dtype) @ w.T).float()) for s in range(0, hidden.size(0), chunk)])


def _rows(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The hidden states [N, H] at flat target positions of a [B, L, H] tensor (position t
    predicts token t + 1)."""
    return hidden[:, :-1].reshape(-1, hidden.size(-1)).index_select(0, positions)
