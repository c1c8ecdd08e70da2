"""Do the teacher and the student fit together? Checked before anything is submitted.

Pairs that disagree on the end-of-sequence token, the vocabulary or the lengths fail mid-run
elsewhere (lengths explode at generation, a KD loss teaches the student never to stop, ids
index past a head). Each problem is one line; only what would break training or generation
refuses the run, the rest are notes. Read from each model folder's tokenizer, config.json and
generation_config.json; no weights are loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.config import RunConfig
from distill.errors import DistillError
from distill.memory import CHARS_PER_TOKEN


@dataclass(frozen=True)
class Finding:
    blocking: bool
    line: str


@dataclass(frozen=True)
class ModelFacts:
    """What the check reads of one model folder."""

    key: str  # models.teacher / models.student
    tokenizer: Any
    stops: tuple[str, ...]  # the tokens its generation ends at (generation_config's and the tokenizer's EOS)
    rows: int  # config.json's vocab_size: the rows of its embedding and head
    max_positions: int | None

    @property
    def eos(self) -> str | None:
        return self.tokenizer.eos_token


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def model_facts(key: str, folder: str | Path, tokenizer: Any) -> ModelFacts:
    """The facts of the model in `folder` whose tokenizer (as a job loads it) is `tokenizer`."""
    config = read_json(Path(folder) / "config.json")
    config = config.get("text_config", config)  # a multimodal wrapper keeps the language model's inside
    eos = read_json(Path(folder) / "generation_config.json").get("eos_token_id", config.get("eos_token_id"))
    ids = [i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)]
    stops = {tokenizer.convert_ids_to_tokens(i) for i in ids} | {tokenizer.eos_token}
    return ModelFacts(key, tokenizer, tuple(sorted(s for s in stops if s)), int(config.get("vocab_size") or 0),
                      config.get("max_position_embeddings"))


def eos_findings(teacher: ModelFacts, student: ModelFacts, logits: bool) -> list[Finding]:
    """The student learns to stop on its EOS, appended to every rationale; an objective that
    matches the teacher's distributions needs the teacher to end its rationales on that token too."""
    if student.eos is None:
        return [Finding(True, f"{student.key}: the tokenizer has no EOS token, so the student cannot learn to stop")]
    if logits and student.eos not in teacher.stops:
        return [Finding(True, f"{student.key}: its EOS {student.eos!r} is not a token the teacher's rationales end "
                              f"with ({', '.join(map(repr, teacher.stops))}): at the end of every rationale the "
                              "teacher's distribution would teach the student not to stop; use objective sft, or a "
                              "pair that ends on the same token")]
    return []


def vocabulary_findings(teacher: ModelFacts, student: ModelFacts, logits: bool) -> list[Finding]:
    """Ids mean the same tokens (`vocabulary_relation`), every id the student uses is a row of the
    teacher's head; rows past a tokenizer's size are padding and never read."""
    if not logits:
        return []
    from distill.distillation import vocabulary_relation  # torch: imported only when a pair is checked

    relation = vocabulary_relation(student.tokenizer, teacher.tokenizer)
    if relation == "different":
        return [Finding(True, f"{teacher.key}: its tokenizer is neither the student's nor an id-preserving "
                              f"extension of it ({len(teacher.tokenizer)} vs {len(student.tokenizer)} tokens): "
                              "teacher and student logits cannot be compared token by token; use objective sft")]
    if teacher.rows and teacher.rows < len(student.tokenizer):
        return [Finding(True, f"{teacher.key}: its head has {teacher.rows} rows, fewer than the student's "
                              f"{len(student.tokenizer)} tokens")]
    padded = [f"{m.key} {m.rows}" for m in (teacher, student) if m.rows > len(m.tokenizer)]
    if padded:
        return [Finding(False, f"vocabularies: {relation}; rows past the tokenizers' {len(student.tokenizer)} tokens "
                               f"are padding and ignored ({', '.join(padded)} rows)")]
    return []


def length_findings(teacher: ModelFacts, student: ModelFacts, cfg: RunConfig, logits: bool) -> list[Finding]:
    """The configured lengths against each model's `max_position_embeddings`."""
    out = []
    template = math.ceil(len(cfg.prompt.template) / CHARS_PER_TOKEN)  # the prompt before its question
    needs = [(student, "train.max_length", cfg.train.max_length),
             (teacher, "generation.max_new_tokens", template + cfg.generation.max_new_tokens),
             (student, "eval.max_new_tokens", template + cfg.eval.max_new_tokens)]
    if logits:
        needs.append((teacher, "train.max_length", cfg.train.max_length))
    for model, key, tokens in needs:
        if model.max_positions and tokens > model.max_positions:
            out.append(Finding(True, f"{key}: needs {tokens} positions, more than {model.key} has "
                                     f"(max_position_embeddings {model.max_positions}); lower {key}"))
    return out


def template_findings(teacher: ModelFacts, student: ModelFacts, cfg: RunConfig) -> list[Finding]:
    """With `prompt.use_chat_template`, a model without a template gets plain-text prompts; the
    student's template should end an assistant turn on a token its generation stops at."""
    if not cfg.prompt.use_chat_template:
        return []
    out = [Finding(False, f"{m.key}: no chat template; its prompts are plain text")
           for m in (teacher, student) if not getattr(m.tokenizer, "chat_template", None)]
    if getattr(student.tokenizer, "chat_template", None):
        turn = student.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "ANSWER"}], tokenize=False,
            **cfg.prompt.chat_template_kwargs)
        after = turn.split("ANSWER", 1)[-1]
        if not any(stop in after for stop in student.stops):
            out.append(Finding(False, f"{student.key}: its chat template ends an assistant turn with "
                                      f"{after.strip()[:20]!r}, not a token its generation stops at "
                                      f"({', '.join(map(repr, student.stops))}); the student stops on its EOS, "
                                      "which training teaches"))
    return out


def pair_findings(teacher: ModelFacts, student: ModelFacts, cfg: RunConfig) -> list[Finding]:
    """Every problem of this teacher/student pair under `cfg`, blocking ones first."""
    from distill import objectives  # torch: imported only when a pair is checked
    from distill.config import undo_train

    logits = any(objectives.build(t).teacher() != "none" for t in (cfg.train, undo_train(cfg)))
    found = (eos_findings(teacher, student, logits) + vocabulary_findings(teacher, student, logits)
             + length_findings(teacher, student, cfg, logits) + template_findings(teacher, student, cfg))
    return sorted(found, key=lambda f: not f.blocking)


def check_pair(cfg: RunConfig, recorded: dict[str, Any]) -> list[str]:
    """Before anything is submitted (the driver, `jobs.sbatch prepare`), once hub models are
    resolved (`recorded`: the run's resolved models): a DistillError naming the blocking
    problems of the pair, else the notes, one line each."""
    from distill.hub import MODEL_KEYS, local_models
    from distill.preflight import load_local_tokenizer

    local = local_models(cfg, recorded)
    folders = {key: getattr(local.models, key) for key in MODEL_KEYS}
    facts = {key: model_facts(f"models.{key}", path, load_local_tokenizer(path)) for key, path in folders.items()}
    found = pair_findings(facts["teacher"], facts["student"], cfg)
    blocking = [f.line for f in found if f.blocking]
    if blocking:
        raise DistillError(f"{cfg.source}: teacher and student do not fit: {'; '.join(blocking)}")
    return [f"note: {f.line}" for f in found]
