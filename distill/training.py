"""Student training: a loop you can read top to bottom, with checkpoints that survive any kill.

Why not `transformers.Trainer`: its checkpoints are written in place, so a job killed mid-save
leaves a newest checkpoint that auto-resume picks and fails on. Here every checkpoint is written
to a temporary directory, sealed with its files' hashes and renamed into place only when
complete; a resume checks the seal and sets a damaged checkpoint aside for the one before it.
The batch order is a pure function of (seed, step), so a resumed run sees exactly the batches
an uninterrupted run would have seen.

Batches are built on the host and moved to the job's device (`distill.device`); the loss runs
under the configured precision's autocast, with loss scaling for fp16. A step whose loss is not
finite stops the job before the optimizer touches the weights. An update that leaves a trainable
weight inf or NaN (a finite loss does not rule that out: an overflowing step, a bad kernel) stops
it before those weights are sealed into a checkpoint or saved as the model; so a sealed checkpoint
holds finite weights, and the error names the newest such checkpoint. The final model is saved with a record
of the sealed checkpoint it came from (`model.source.json` beside it): a model on disk is taken as
the finished run's only when it matches that record and its tensors are finite (`model_damage`).

Under torchrun (`train.distributed: ddp | fsdp`) each process is one rank and runs this same
loop on its part of every micro-batch (`distill.ranks`): a step's batch, its loss and its
gradient are those of one process. Checkpoints are written by every rank into one temporary
directory, sealed and renamed by rank 0 once all parts are in; a stop asked of any rank stops
all of them after the same step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distill import device as devices
from distill import objectives
from distill.curves import Curves
from distill.distillation import IGNORE, Distiller, to_device
from distill.errors import DistillError, writing
from distill.integrity import (
    content_hash,
    nonfinite_tensor,
    seal,
    seal_damage,
    seal_digest,
    set_aside,
    source_file,
)
from distill.jsonl import atomic_write_text
from distill.layout import TrainPaths, complete_checkpoints, newest_checkpoint  # noqa: F401 - callers import it here
from distill.modeling import load_student, save_final
from distill.progress import progress_bar
from distill.ranks import Ranks, accumulating, gathered, join, load_sharded, save_sharded, wrap
from distill.train_config import TrainConfig

log = logging.getLogger(__name__)
DCP_METADATA = ".metadata"  # what torch.distributed.checkpoint writes beside the shards (fsdp)


@dataclass
class TrainResult:
    finished: bool  # False when stopped early by `should_stop` (preemption, time limit)
    step: int
    total_steps: int
    loss: float | None
    tokens_per_s: float
    resumed_from: int | None
    model_dir: Path | None
    model_sha256: str | None = None  # content_hash of model_dir, taken when it was saved or checked


def tokenize_pairs(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int,
    teacher_prompt: Callable[[str], str | None] | None = None,
) -> list[dict[str, list[int]]]:
    """(prompt, completion) -> ids with the prompt masked out of the loss.

    The completion ends with the end-of-sequence token so the student learns to stop.
    Prompt and completion are tokenized apart so the mask boundary is exact. Where
    `teacher_prompt` gives the teacher a prompt of its own (context distillation), each example
    also gets the teacher's sequence: that prompt, then the same completion tokens.
    """
    examples = []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(p) >= max_length:
            continue
        ids = (p + c)[:max_length]
        example = {"input_ids": ids, "labels": ([IGNORE] * len(p) + c)[:max_length]}
        own = teacher_prompt(prompt) if teacher_prompt is not None else None
        if own is not None:
            tp = tokenizer(own, add_special_tokens=False)["input_ids"]
            kept = c[: len(ids) - len(p)]
            example |= {"t_input_ids": tp + kept, "t_labels": [IGNORE] * len(tp) + kept}
        examples.append(example)
    return examples


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate(batch: list[dict[str, list[int]]], pad_id: int, index: list[int] | None = None) -> dict[str, Any]:
    """Right-padded tensors; the teacher's sequences too when the examples have them."""
    out: dict[str, Any] = {
        "input_ids": pad_rows([ex["input_ids"] for ex in batch], pad_id),
        "attention_mask": pad_rows([[1] * len(ex["input_ids"]) for ex in batch], 0),
        "labels": pad_rows([ex["labels"] for ex in batch], IGNORE),
        "index": index or [],
    }
    if "t_input_ids" in batch[0]:
        out["t_input_ids"] = pad_rows([ex["t_input_ids"] for ex in batch], pad_id)
        out["t_attention_mask"] = pad_rows([[1] * len(ex["t_input_ids"]) for ex in batch], 0)
        out["t_labels"] = pad_rows([ex["t_labels"] for ex in batch], IGNORE)
    if any(ex.get("sampled") for ex in batch):
        out["sampled"] = True
    return out


def pack(batch: list[dict[str, list[int]]], pad_id: int, width: int, index: list[int] | None = None) -> dict[str, Any]:
    """The examples of a micro-batch packed into as few rows of at most `width` tokens as
    first-fit (longest first) allows, instead of one padded row each.

    Each example keeps its own positions (0, 1, ...) and attends only to itself: the attention
    mask is 4-D (rows, 1, length, length), causal within each example's span, so a packed row
    computes what the examples would alone. No target crosses a boundary: every example starts
    with prompt tokens, which carry no label. `placement[i]` is example i's (row, start).
    """
    fill: list[int] = []  # tokens used per row
    placement: list[tuple[int, int]] = [(0, 0)] * len(batch)
    for i in sorted(range(len(batch)), key=lambda i: -len(batch[i]["input_ids"])):
        n = len(batch[i]["input_ids"])
        row = next((r for r, used in enumerate(fill) if used + n <= width), len(fill))
        if row == len(fill):
            fill.append(0)
        placement[i] = (row, fill[row])
        fill[row] += n
    shape = (len(fill), max(fill))
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    for i, (row, start) in enumerate(placement):
        n = len(batch[i]["input_ids"])
        ids[row, start : start + n] = torch.tensor(batch[i]["input_ids"])
        labels[row, start : start + n] = torch.tensor(batch[i]["labels"])
        positions[row, start : start + n] = torch.arange(n)
        segment[row, start : start + n] = i
    causal = torch.ones(shape[1], shape[1], dtype=torch.bool).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0) & causal
    mask |= torch.eye(shape[1], dtype=torch.bool)  # padding attends to itself: no empty softmax row
    return {"input_ids": ids, "attention_mask": mask[:, None], "position_ids": positions, "labels": labels,
            "index": index or [], "placement": placement}


def micro_batch_indices(n_examples: int, batch_size: int, seed: int, micro: int) -> list[int]:
    """Example indices of global micro-batch `micro`: reshuffled each epoch, fixed by the seed."""
    per_epoch = math.ceil(n_examples / batch_size)
    epoch, pos = divmod(micro, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return perm[pos * batch_size : (pos + 1) * batch_size].tolist()


def total_steps(cfg: TrainConfig, n_examples: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum))
    return max(1, math.ceil(cfg.epochs * per_epoch))


# -- checkpoints -------------------------------------------------------------------------------


def resumable_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint whose files match their hashes. A damaged one is renamed
    `damaged-step-N` (kept for a look, never resumed or counted again) and the one before it
    is tried."""
    for ckpt in reversed(complete_checkpoints(ckpt_dir)):
        damage = seal_damage(ckpt)
        if damage is None:
            return ckpt
        aside = ckpt.with_name(f"damaged-{ckpt.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(ckpt, aside)
        log.warning("checkpoint %s is damaged (%s): set aside as %s; trying the one before", ckpt, damage, aside.name)
    return None


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, state: dict[str, Any], keep: int,
                    scaler: torch.amp.GradScaler | None = None, ranks: Ranks | None = None) -> Path:
    """Every rank writes its part into one temporary directory (named by rank 0's process), then
    rank 0 seals it and renames it into place; every rank returns once it is there. On several
    hosts the directory must be on a filesystem they share."""
    ranks = ranks or Ranks()
    final = ckpt_dir / f"step-{step:08d}"
    tmp = ckpt_dir / f".tmp-step-{step:08d}-{ranks.pid}"
    try:
        with writing(final):
            ranks.together(lambda: _write_checkpoint(tmp, model, optimizer, scheduler, state, scaler, ranks))
            ranks.together(lambda: _seal(tmp) if ranks.main else None)
    except BaseException:
        if ranks.main:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back at once
        raise
    if ranks.main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        for old in complete_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    ranks.barrier()
    return final


def _write_checkpoint(tmp: Path, model, optimizer, scheduler, state: dict[str, Any],
                      scaler: torch.amp.GradScaler | None, ranks: Ranks) -> None:
    """This rank's part: the model and optimizer state (fsdp: every rank its shards; else rank 0),
    its random state, and from rank 0 the rest, which every rank has alike."""
    tmp.mkdir(parents=True, exist_ok=True)
    if ranks.sharded:
        save_sharded(tmp, model, optimizer)
    elif ranks.main:
        save_file(_trainable_state(model), str(tmp / "weights.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if ranks.main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None and scaler.is_enabled():
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save(devices.rng_state(_device_of(model)), tmp / _rng_file(ranks.rank))
    if ranks.main:
        (tmp / "state.json").write_text(json.dumps(state, indent=1))


def _seal(tmp: Path) -> None:
    seal(tmp)
    _fsync_dir(tmp)


def _rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-{rank}.pt"


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler: torch.amp.GradScaler | None = None,
                    ranks: Ranks | None = None) -> dict[str, Any]:
    """A checkpoint read back on every rank; sharded state is resharded to this world size. A
    rank with no random state of its own in it (the world grew) takes rank 0's."""
    ranks = ranks or Ranks()
    if (path / DCP_METADATA).is_file() != ranks.sharded:
        written = "fsdp" if (path / DCP_METADATA).is_file() else "none or ddp"
        raise DistillError(f"{path}: written with train.distributed {written}; this run has {ranks.mode}: "
                           "resume with the setting the run started with")
    device = _device_of(model)
    if ranks.sharded:
        load_sharded(path, model, optimizer)
    else:
        weights = load_file(str(path / "weights.safetensors"))
        params = dict(model.named_parameters())
        for name, tensor in weights.items():
            params[name].data.copy_(tensor)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False, map_location=device))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if scaler is not None and scaler.is_enabled() and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    rng = path / _rng_file(ranks.rank)
    devices.set_rng_state(torch.load(rng if rng.exists() else path / _rng_file(0), weights_only=False), device)
    return json.loads((path / "state.json").read_text())


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- finite weights ------------------------------------------------------------------------------


def nonfinite(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """1.0 when any of `params` holds an inf or NaN, else 0.0, as a tensor on their device: queued,
    not waited for, so the loop reads it with the next step's loss at no extra synchronisation.

    One fused max-abs per tensor (`_foreach_norm` with ord inf: a NaN or inf anywhere carries
    through it, and unlike the 2-norm it cannot overflow on large finite weights). Sharded
    parameters (fsdp) are checked on each rank's own shard; the caller sums the flags over ranks.
    """
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    with torch.no_grad():
        norms = torch._foreach_norm(local, float("inf"), dtype=torch.float32)
        return (~torch.isfinite(torch.stack(norms)).all()).float()


def any_nonfinite(flag: torch.Tensor, ranks: Ranks) -> bool:
    """Whether `nonfinite`'s flag is set on any rank (the same answer on every rank)."""
    return ranks.sum(flag.detach().clone()).item() > 0


def finite_checkpoint(ckpt: Path) -> bool:
    """Whether a sealed checkpoint's weights are all finite. A sharded one (fsdp) is taken as
    written: every rank checked its shards before the seal went on."""
    if (ckpt / DCP_METADATA).is_file():
        return True
    try:
        return nonfinite_tensor(ckpt / "weights.safetensors") is None
    except Exception:  # unreadable: not one to name as good
        return False


def last_finite_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest sealed checkpoint with finite weights: the state a stopped run can go back to.
    Read only when training stops on a non-finite value, so it may read every checkpoint."""
    return next((c for c in reversed(complete_checkpoints(ckpt_dir)) if finite_checkpoint(c)), None)


def nonfinite_weights(step: int, ckpt_dir: Path) -> DistillError:
    kept = last_finite_checkpoint(ckpt_dir)
    last = (f"the last checkpoint with finite weights is {kept}" if kept
            else "no checkpoint with finite weights was written yet")
    return DistillError(f"train: weights are not finite after step {step}: stopped before saving them; {last} "
                        "(lower train.lr, or check the model and data)")


# -- the final model -----------------------------------------------------------------------------


def model_record(out: TrainPaths) -> Path:
    """Beside the model: the sealed checkpoint it was saved from and its content hash."""
    return source_file(out.model)


def record_model(out: TrainPaths, ckpt: Path, digest: str) -> None:
    record = {"checkpoint": ckpt.name, "seal": seal_digest(ckpt), "sha256": digest}
    atomic_write_text(model_record(out), json.dumps(record, indent=1) + "\n")


def model_damage(out: TrainPaths, ckpt: Path, digest: str) -> str | None:
    """Why the model at `out.model` (content hash `digest`) is not to be taken as the one saved
    from the sealed checkpoint `ckpt` (one phrase), or None. It must be recorded as saved from
    exactly that checkpoint (its name and the hash of its seal), be unchanged since, and hold
    only finite tensors; a model without a record is not taken on trust."""
    try:
        record = json.loads(model_record(out).read_text())
    except (OSError, ValueError):
        return f"no readable {model_record(out).name} names the checkpoint it was saved from"
    if record.get("checkpoint") != ckpt.name or record.get("seal") != seal_digest(ckpt):
        return f"saved from {record.get('checkpoint')} as it was then, not from {ckpt.name} as it is now"
    if record.get("sha256") != digest:
        return "changed since it was saved (sha256 differs)"
    try:
        bad = nonfinite_tensor(out.model)
    except Exception as exc:
        return f"weights unreadable ({exc})"
    return f"{bad} is not finite" if bad else None


def save_model(final: Any, tokenizer: Any, out: TrainPaths, ckpt: Path, place: devices.Placement,
               model_path: str | Path, quantized: bool) -> str:
    """Save the final model, check every saved tensor is finite (a cast to fp16 or a LoRA merge
    can overflow weights that trained finite) and record the checkpoint it came from; its hash."""
    save_final(final, tokenizer, out.model, dtype=place.dtype, base_path=model_path, quantized=quantized)
    bad = nonfinite_tensor(out.model)
    if bad is not None:
        set_aside(out.model)
        raise DistillError(f"train: {out.model}: {bad} is not finite once saved in {place.dtype}, though the trained "
                           f"weights are (an overflow in the cast or the LoRA merge): "
                           f"set aside as {out.model.name}.damaged")
    digest = content_hash(out.model)
    record_model(out, ckpt, digest)
    return digest


# -- the loop ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Focus:
    """Prompts whose examples an objective that draws its own (onpolicy) leans toward, e.g. the
    mined errors of an UNDO iteration, and the share of its draws that go to them."""

    prompts: frozenset[str]
    share: float

    def indices(self, tokenizer: Any, examples: list[dict[str, list[int]]]) -> list[int]:
        """The examples whose prompt is one of `prompts`, as tokenized for training."""
        wanted = {tuple(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in self.prompts}
        return [i for i, ex in enumerate(examples)
                if tuple(ex["input_ids"][: next(j for j, lab in enumerate(ex["labels"]) if lab != IGNORE)]) in wanted]


def train(
    model_path: str | Path,
    pairs: Sequence[tuple[str, str]],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = True,
    teacher_path: str | Path | None = None,
    attn_implementation: str = "sdpa",
    device: str | torch.device | None = None,
    focus: Focus | None = None,
    topk_store: Path | None = None,
) -> TrainResult:
    """Train on (prompt, completion) pairs with `cfg.objective` (the teacher at `teacher_path`
    for an objective that needs one); resume from `out_dir/checkpoints` if any. `device` overrides
    the job's own choice (its GPU, else the CPU). `focus` steers an objective that draws its own
    examples; `topk_store` is the teacher's top-k the score stage stored for these pairs (offline
    KD then never loads the teacher).

    Started by torchrun with `train.distributed` ddp or fsdp, this process is one rank of the
    run (`distill.ranks`): every rank calls `train` with the same arguments and gets the same
    result, and the steps, losses and checkpoints are those of one process at the same batch."""
    place = devices.placement(cfg.precision, device)
    devices.check_training_hardware(cfg.quantize, attn_implementation, place.device)
    if cfg.distributed == "fsdp" and place.precision == "fp16":
        raise DistillError(f"train.distributed: fsdp with fp16 loss scaling is not supported ({place.describe()} has "
                           "no bf16); use ddp on this GPU")
    with join(cfg.distributed, place.device) as ranks:
        return _train(model_path, pairs, cfg, TrainPaths(Path(out_dir)), place, ranks, should_stop, progress,
                      teacher_path, attn_implementation, focus, topk_store)


def _train(model_path: str | Path, pairs: Sequence[tuple[str, str]], cfg: TrainConfig, out: TrainPaths,
           place: devices.Placement, ranks: Ranks, should_stop: Callable[[], bool] | None, progress: bool,
           teacher_path: str | Path | None, attn_implementation: str, focus: Focus | None = None,
           topk_store: Path | None = None) -> TrainResult:
    _clear_stale(out, ranks)
    model, tokenizer = load_student(model_path, cfg, place, attn_implementation)
    examples = tokenize_pairs(tokenizer, pairs, cfg.max_length, teacher_prompt=objectives.build(cfg).teacher_prompt)
    if not examples:
        raise DistillError(f"train: no training examples: all {len(pairs)} prompts are at least train.max_length "
                           f"({cfg.max_length}) tokens long; raise train.max_length")
    distiller = Distiller(cfg, tokenizer, teacher_path, out, examples, place, attn_implementation, ranks,
                          topk_store=topk_store, focus=focus and (focus.indices(tokenizer, examples), focus.share))
    distiller.attach(model)
    net = wrap(model, distiller, ranks)  # the loss as a module: inside DDP, or sharded by FSDP, on several ranks
    steps = total_steps(cfg, len(examples))
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer, scheduler = _optimizer(params, cfg, place, steps)
    stepper = _Stepper(net, distiller, examples, cfg, place, ranks, optimizer, scheduler, place.grad_scaler(), params,
                       tokenizer.pad_token_id, out.checkpoints)
    state: dict[str, Any] = {"step": 0, "total_steps": steps, "n_examples": len(examples), "history": []}
    resumed_from = None
    ckpt = ranks.broadcast(resumable_checkpoint(out.checkpoints) if ranks.main else None)  # later: the newest saved
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler, stepper.scaler, ranks)
        resumed_from = state["step"]
        log.info("resumed from %s (step %d of %d)", ckpt, state["step"], steps)

    model.train()
    tokens, start, loss_value = 0, time.perf_counter(), None
    weights_bad = torch.zeros((), device=place.device)  # the last update's `nonfinite`, read with the next loss
    log_dir = out.root / "tensorboard" if ranks.main and "tensorboard" in cfg.report_to else None
    rate = _Rate()
    with progress_bar(total=steps, initial=state["step"], desc="train", unit="step",
                      disable=not progress or not ranks.main) as bar, Curves(log_dir, state["history"]) as curves:
        while state["step"] < steps:
            loss_value, (ce_value, ce_part), step_tokens, weights_bad, grad_norm = stepper.step(state["step"],
                                                                                               weights_bad)
            tokens += step_tokens
            state["step"] += 1
            if state["step"] % cfg.log_steps == 0 or state["step"] == steps:
                row = {"step": state["step"], "loss": round(loss_value, 6), "ce": round(ce_value, 6),
                       "lr": scheduler.get_last_lr()[0], "grad_norm": round(float(grad_norm), 6),
                       **distiller.teacher_term(loss_value, ce_part), **rate.since(tokens)}
                state["history"].append(row)
                curves.add(row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            # A stop asked of any rank (USR2 reaches one process first) stops every rank at this step.
            stop = ranks.any(should_stop is not None and should_stop())
            if state["step"] % cfg.save_steps == 0 or state["step"] == steps or stop:
                if any_nonfinite(weights_bad, ranks):
                    raise nonfinite_weights(state["step"], out.checkpoints)
                state["loss"] = loss_value
                ckpt = save_checkpoint(out.checkpoints, state["step"], model, optimizer, scheduler, state,
                                       cfg.keep_checkpoints, stepper.scaler, ranks)
                curves.flush()
            if stop and state["step"] < steps:
                return TrainResult(False, state["step"], steps, loss_value, _rate(tokens, start), resumed_from, None)
    return _finish(model_path, cfg, out, place, ranks, model, tokenizer, params, ckpt, state, steps, resumed_from,
                   loss_value, _rate(tokens, start))


def _clear_stale(out: TrainPaths, ranks: Ranks) -> None:
    """Remove what a killed save left (this unit is the only writer of its directory)."""
    out.checkpoints.mkdir(parents=True, exist_ok=True)
    if ranks.main:
        for stale in [*out.checkpoints.glob(".tmp-*"), *out.root.glob(".tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    ranks.barrier()


@dataclass
class _Stepper:
    """What one optimizer step uses, built once by `_train`."""

    net: torch.nn.Module
    distiller: Distiller
    examples: list[dict[str, list[int]]]
    cfg: TrainConfig
    place: devices.Placement
    ranks: Ranks
    optimizer: Any
    scheduler: Any
    scaler: Any
    params: list[torch.Tensor]
    pad_id: int
    ckpt_dir: Path

    def step(self, step: int, weights_bad: torch.Tensor
             ) -> tuple[float, tuple[float, float], int, torch.Tensor, torch.Tensor]:
        """Optimizer step `step`: the loss summed over its micro-batches and ranks, the
        cross-entropy per target token and its weighted share of the loss, the tokens it saw,
        whether the update made a weight non-finite (read with the next step's loss, so a step
        waits for the device once), and the gradient norm before clipping (a tensor: read only
        at logged steps).
        Raises before the update when the loss, or the last update's weights, are not finite."""
        cfg, ranks, device = self.cfg, self.ranks, self.place.device
        def pick(idx: list[int], micro: int) -> list[dict[str, list[int]]]:
            return self.distiller.objective.resample(self.distiller, [self.examples[i] for i in idx], idx, step, micro)

        indices, parts, micro_batches, n_target = _micro_batches(self.examples, cfg, step, ranks, self.pad_id, pick)
        total = torch.zeros((), device=device)
        ce_total = torch.zeros(2, device=device)  # summed CE, and its weighted share of the loss
        for j, (batch, (_, counted)) in enumerate(zip(micro_batches, parts, strict=True)):
            batch = to_device(self.distiller.prepare(batch), device)
            with accumulating(self.net, last=j == cfg.grad_accum - 1):
                with self.place.autocast():
                    loss, ce_sum, ce_part = self.net(batch, n_target, cfg.grad_accum, counted)
                # DDP and FSDP average gradients over the ranks; this rank's share of the loss,
                # times the world size, averages to the whole step's (distill.ranks).
                self.scaler.scale(loss * ranks.world).backward()
            total += loss.detach()
            ce_total += torch.stack([ce_sum, ce_part])
        loss_value, ce_value, ce_share, bad = ranks.sum(torch.cat([total[None], ce_total, weights_bad[None]])).tolist()
        if bad or not math.isfinite(loss_value):
            raise nonfinite_weights(step, self.ckpt_dir) if bad else nonfinite_loss(loss_value, step, self.ckpt_dir)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(len(self.examples[i]["input_ids"]) for idx in indices for i in idx)
        return (loss_value, (ce_value / max(n_target, 1), ce_share), tokens, nonfinite(self.params),
                grad_norm.detach())


def _finish(model_path: str | Path, cfg: TrainConfig, out: TrainPaths, place: devices.Placement, ranks: Ranks,
            model: torch.nn.Module, tokenizer: Any, params: list[torch.Tensor], ckpt: Path, state: dict[str, Any],
            steps: int, resumed_from: int | None, loss_value: float | None, rate: float) -> TrainResult:
    """The finished run's model: saved from the final checkpoint `ckpt` (or, on a rerun, the
    one already saved from it, once checked)."""
    if resumed_from == steps and out.model.is_dir():
        # Finished before and saved (a model is renamed into place only when complete): a rerun
        # changes nothing on disk, once the model is the one saved from this checkpoint.
        digest, damage = ranks.broadcast(_saved_model(out, ckpt) if ranks.main else (None, None))
        if damage is None:
            return TrainResult(True, steps, steps, state.get("loss", loss_value), 0.0, resumed_from, out.model, digest)
        log.warning("%s: %s: set aside as %s.damaged and saved again from %s", out.model, damage, out.model.name, ckpt)
        if ranks.main:
            set_aside(out.model)
    # Weights loaded from the final checkpoint were never checked by this loop (one written
    # before such checks, say); the loop checked its own before sealing them.
    if resumed_from == steps and any_nonfinite(nonfinite(params), ranks):
        raise nonfinite_weights(state["step"], out.checkpoints)
    # fsdp: the shards gathered into a plain copy of the student on rank 0's host.
    final = gathered(model, ranks, lambda: load_student(model_path, cfg, devices.Placement(torch.device("cpu"),
                                                                                          place.precision))[0])
    saved: list[str] = []
    with writing(out.model):
        ranks.together(lambda: saved.append(save_model(final, tokenizer, out, ckpt, place, model_path,
                                                       cfg.quantize == "4bit")) if ranks.main else None)
    return TrainResult(True, state["step"], steps, state.get("loss", loss_value), rate, resumed_from,
                       out.model, ranks.broadcast(saved[0] if saved else None))


def _optimizer(params: list[torch.Tensor], cfg: TrainConfig, place: devices.Placement, steps: int) -> tuple[Any, Any]:
    """AdamW over the trained parameters and the learning-rate schedule of `steps` steps."""
    from transformers import get_scheduler

    # fused: one kernel per step instead of a Python loop over the parameters, where the device has it
    fused = place.device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps), num_training_steps=steps
    )
    return optimizer, scheduler


def _micro_batches(examples: list[dict[str, list[int]]], cfg: TrainConfig, step: int, ranks: Ranks, pad_id: int,
                   pick: Callable[[list[int], int], list[dict[str, list[int]]]] | None = None,
                   ) -> tuple[list[list[int]], list[tuple[list[int], bool]], list[dict[str, Any]], int]:
    """Step `step`'s micro-batches: their example indices, this rank's part of each (all of it on
    one rank) and whether it counts, the collated (or packed) parts, and the step's target count
    over every rank. `pick(indices, micro)` gives the examples a part trains on (default: those
    of the training set; an on-policy objective samples new completions)."""
    pick = pick or (lambda idx, micro: [examples[i] for i in idx])
    indices = [micro_batch_indices(len(examples), cfg.batch_size, cfg.seed, step * cfg.grad_accum + j)
               for j in range(cfg.grad_accum)]
    parts = [ranks.part(idx) for idx in indices]
    chosen = [pick(idx, j) for j, (idx, _) in enumerate(parts)]
    micro_batches = [pack(exs, pad_id, cfg.max_length, idx) if cfg.packing else collate(exs, pad_id, idx)
                     for exs, (idx, _) in zip(chosen, parts, strict=True)]
    n_target = ranks.total(sum(int((b["labels"][:, 1:] != IGNORE).sum())
                               for b, (_, counted) in zip(micro_batches, parts, strict=True) if counted))
    return indices, parts, micro_batches, n_target


def nonfinite_loss(loss_value: float, step: int, ckpt_dir: Path) -> DistillError:
    kept = last_finite_checkpoint(ckpt_dir)
    return DistillError(f"train: loss is {loss_value} at step {step + 1}: stopped before the update; "
                        f"{f'the last good checkpoint is {kept}' if kept else 'no checkpoint was written yet'} "
                        "(lower train.lr, or check the model and data)")


def _saved_model(out: TrainPaths, ckpt: Path) -> tuple[str, str | None]:
    """The saved model's content hash, and what is wrong with it (`model_damage`)."""
    digest = content_hash(out.model)
    return digest, model_damage(out, ckpt, digest)


class _Rate:
    """Tokens per second between logged steps, for the curves."""

    def __init__(self) -> None:
        self.at, self.tokens = time.perf_counter(), 0

    def since(self, tokens: int) -> dict[str, float]:
        now = time.perf_counter()
        rate = (tokens - self.tokens) / (now - self.at) if now > self.at else 0.0
        self.at, self.tokens = now, tokens
        return {"tokens_per_s": round(rate, 1), "time": round(time.time(), 3)}


def _rate(tokens: int, start: float) -> float:
    seconds = time.perf_counter() - start
    return round(tokens / seconds, 1) if seconds > 0 else 0.0
