"""`score`: the teacher's top-k logprobs over the student's own training tokens, in array shards.

Present in an iteration whose objective reads stored teacher logprobs (`kd` or `ekd` with
`train.kd.teacher: offline`). It scores the iteration's training set (`distill.training_set`)
tokenized exactly as training tokenizes it, so training reads the merged store
(`RunPaths.scores`) and never loads the teacher; the store records the sha256 of those tokens and
training refuses a store made for others. Scoring is a teacher job like generation: the shards
are `generation.num_shards`, the engine is `generation.backend` (transformers: a forward pass;
vLLM: `prompt_logprobs=k` over the token ids), the resources are the profile's `generate`.

A shard writes its examples in parts of `generation.batch_size`, each a complete store file
(`distill.topk_store`) renamed into place: a killed shard resumes after its last whole part and
the merge checks that the parts cover every example of every shard exactly once.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distill import objectives
from distill.config import RunConfig, iteration_train
from distill.data import shard_slice
from distill.integrity import Input, artifact
from distill.layout import RunPaths
from distill.rationales import VERIFY, rationales_kept
from distill.stage import FIRST, UNDO, RedoUnit, Result, Stage, Unit
from distill.training_set import training_set

PART = re.compile(r"^part-(\d{8})-(\d{8})\.safetensors$")
SOURCE = "source.json"


def needed(cfg: RunConfig, it: int) -> bool:
    """Whether iteration `it`'s objective reads stored teacher logprobs."""
    return objectives.build(iteration_train(cfg, it)).teacher() == "offline"


def score_examples(cfg: RunConfig, it: int) -> tuple[list[dict[str, list[int]]], int]:
    """Iteration it's training examples as training tokenizes them, and the student's vocabulary size."""
    from distill.modeling import load_tokenizer
    from distill.prompts import training_pairs
    from distill.training import tokenize_pairs

    tcfg = iteration_train(cfg, it)
    tokenizer = load_tokenizer(cfg.models.student)
    pairs = training_pairs(cfg.prompt, training_set(cfg, it), tokenizer)
    return tokenize_pairs(tokenizer, pairs, tcfg.max_length), len(tokenizer)


def teacher_scores(backend: Any, examples: list[dict[str, list[int]]], k: int,
                   vocab: int) -> Iterator[tuple[Any, Any, list[int]]]:
    """(ids [N, k], logprobs [N, k], completion tokens per example) of the teacher's top-k at every
    completion token of `examples`: vLLM's `prompt_logprobs` where the backend has it, else a
    forward pass of the transformers model."""
    import torch

    from distill.distillation import IGNORE, teacher_topk
    from distill.errors import DistillError

    if not hasattr(backend, "prompt_logprobs"):
        yield from teacher_topk(backend.model, examples, k, vocab, batch_size=len(examples))
        return
    scored = backend.prompt_logprobs([e["input_ids"] for e in examples], k)
    # entry t predicts token t + 1: the targets are the entries before each completion token
    rows = [pos for e, positions in zip(examples, scored, strict=True)
            for t, pos in enumerate(positions) if e["labels"][t + 1] != IGNORE]
    ids = torch.tensor([[int(i) for i, _ in pos] for pos in rows], dtype=torch.int32).reshape(-1, k)
    if ids.numel() and int(ids.max()) >= vocab:
        raise DistillError(f"score: the teacher ranked token id {int(ids.max())} in its top-{k}, outside the student's "
                           f"{vocab}-token vocabulary; score with generation.backend: transformers (its head is cut "
                           "to the student's vocabulary)")
    logprobs = torch.tensor([[lp for _, lp in pos] for pos in rows], dtype=torch.float32).reshape(-1, k)
    yield ids, logprobs, [sum(1 for lab in e["labels"] if lab != IGNORE) for e in examples]


def whole_parts(folder: Path) -> list[tuple[int, int]]:
    """The parts of a shard folder that run contiguously from example 0, (start, end) each."""
    spans = sorted((int(m.group(1)), int(m.group(2))) for p in folder.glob("part-*") if (m := PART.match(p.name)))
    kept: list[tuple[int, int]] = []
    for a, b in spans:
        if a != (kept[-1][1] if kept else 0):
            break
        kept.append((a, b))
    return kept


def part_path(folder: Path, a: int, b: int) -> Path:
    return folder / f"part-{a:08d}-{b:08d}.safetensors"


def resumed(folder: Path, source: dict[str, Any]) -> int:
    """Where a shard resumes: after its whole parts when they were scored by the same teacher
    for the same tokens; otherwise the folder starts again empty."""
    import json

    record = folder / SOURCE
    same = record.exists() and json.loads(record.read_text()) == source
    if not same:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        record.write_text(json.dumps(source, sort_keys=True))
    parts = whole_parts(folder)
    keep = {SOURCE} | {part_path(folder, a, b).name for a, b in parts}
    for stray in folder.iterdir():  # parts past a gap, and the temporary file of a killed write
        if stray.name not in keep:
            stray.unlink()
    return parts[-1][1] if parts else 0


def score(unit: Unit) -> Result:
    """One shard's examples scored by the teacher, part after part (resumes after the last whole one)."""
    from distill.distillation import examples_digest
    from distill.generation import LazyBackend, engine_for
    from distill.progress import progress_bar
    from distill.topk_store import TopKStore, gap_codes, offsets_of

    cfg, it, shard, num = unit.cfg, unit.iteration, int(unit.key), unit.cfg.generation.num_shards
    k, step = iteration_train(cfg, it).kd.top_k, cfg.generation.batch_size
    examples, vocab = score_examples(cfg, it)
    examples = shard_slice(examples, shard, num)
    folder = unit.paths.score_shard(it, shard, num)
    done = resumed(folder, {"model": unit.model_identity(cfg.models.teacher), "k": k,
                            "examples_sha256": examples_digest(examples)})
    start, tokens = time.perf_counter(), 0
    bar = progress_bar(total=len(examples), initial=done, desc=f"score shard {shard}/{num}", unit="example",
                       disable=not unit.progress)
    # vLLM returns at most its engine's max_logprobs per position: the engine keeps k
    engine = dataclasses.replace(engine_for(cfg, "teacher", logprobs=False), logprobs=k)
    with LazyBackend(engine, cfg.models.teacher) as teacher:
        for a in range(done, len(examples), step):
            part = examples[a : a + step]
            (ids, logprobs, counts), = teacher_scores(teacher.get(), part, k, vocab)
            offsets = offsets_of(counts)
            TopKStore.encode(ids, gap_codes(logprobs), offsets).save(part_path(folder, a, a + len(part)), {})
            tokens += int(offsets[-1])
            bar.update(len(part))
    bar.close()
    return Result({"examples": len(examples), "tokens": tokens, "seconds": round(time.perf_counter() - start, 3)})


def merge_scores(cfg: RunConfig, it: int, paths: RunPaths, entry: dict[str, Any]) -> dict[str, Any]:
    """The shards' parts as one store, once they hold every example exactly once."""
    from distill.distillation import examples_digest
    from distill.topk_store import TopKStore

    num, k = cfg.generation.num_shards, iteration_train(cfg, it).kd.top_k
    examples, _ = score_examples(cfg, it)
    stores = []
    for s in range(num):
        folder, n = paths.score_shard(it, s, num), len(shard_slice(examples, s, num))
        parts = whole_parts(folder) if folder.is_dir() else []
        if (parts[-1][1] if parts else 0) != n:
            raise RedoUnit(f"score shard {s}: its parts hold {parts[-1][1] if parts else 0} of {n} examples", [str(s)])
        for a, b in parts:
            try:
                store = TopKStore.load(part_path(folder, a, b))[0]
            except Exception as exc:  # a part damaged after its shard ended: that shard scores again
                part_path(folder, a, b).unlink()
                raise RedoUnit(f"score shard {s}: {part_path(folder, a, b).name} does not load ({exc})",
                               [str(s)]) from None
            if len(store.offsets) != b - a + 1:
                raise RedoUnit(f"score shard {s}: {part_path(folder, a, b).name} holds {len(store.offsets) - 1} "
                               f"examples, not {b - a}", [str(s)])
            stores.append(store)
    store = TopKStore.concat(stores)
    out = paths.scores(it, k)
    store.save(out, {"examples": str(len(examples)), "examples_sha256": examples_digest(examples)})
    return {"num_shards": num, "artifacts": {"topk": artifact(out, paths.root)},
            "metrics": {"examples": len(examples), "tokens": store.tokens, "k": k,
                        "bytes_per_entry": round(out.stat().st_size / max(1, store.tokens * k), 3)}}


def score_inputs(cfg: RunConfig, it: int) -> list[Input]:
    """The verified set; from iteration 1 also D_{it-1}, recorded by the train stage (named, not
    imported: the train stage reads this one's store)."""
    return [VERIFY.output("verified", it), *([Input(it - 1, "train", "train_data")] if it > 0 else [])]


def recover_score(unit: Unit) -> Result | None:
    """A shard whose parts hold every one of its examples."""
    cfg, it, shard, num = unit.cfg, unit.iteration, int(unit.key), unit.cfg.generation.num_shards
    folder = unit.paths.score_shard(it, shard, num)
    parts = whole_parts(folder) if folder.is_dir() else []
    n = len(shard_slice(score_examples(cfg, it)[0], shard, num))
    return Result({"examples": n}) if parts and parts[-1][1] == n else None


SCORE = Stage(
    "score", score, plans=(FIRST, UNDO), units=lambda cfg, it: [str(s) for s in range(cfg.generation.num_shards)],
    sharded=True, merge=merge_scores, inputs=score_inputs, produces=("topk",), recover=recover_score,
    resources="generate", ready=rationales_kept, needed=needed,
    summary=lambda e: (f"stored the teacher's top-{e['metrics']['k']} over {e['metrics']['tokens']} tokens of "
                       f"{e['metrics']['examples']} examples, {e['metrics']['bytes_per_entry']} bytes per entry"),
)
