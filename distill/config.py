"""The run configuration: the schema (typed dataclasses), its hash, and the constraints on its
values that a type cannot express, checked before any job starts.

Every mistake is reported as one line naming the file and the key path, e.g.
`configs/tiny.yaml: train.lr: expected float, got 'fast'`, so a typo never costs a queue wait; a
value given on the command line is named by its override instead
(`--set train.lr=-1: train.lr: must be > 0 and finite, got -1.0`).
Reading YAML into the dataclasses is `distill.typed_yaml`'s; whether paths exist is checked by
`distill.preflight`, and what the job's hardware must offer by `distill.device` when it starts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distill import objectives
from distill.errors import ConfigError, DistillError
from distill.train_config import TrainConfig
from distill.typed_yaml import (
    check_name,
    check_one_line,
    from_mapping,
    override_label,
    parse_overrides,
    read_yaml_mapping,
    set_path,
)


@dataclass
class ModelsConfig:
    """Local model directories (a hub id works only where the hub is reachable)."""

    # The teacher: a local model directory, or a hub ID `org/name[@revision]` resolved once by
    # the driver into the Hugging Face cache (docs/configuration.md, "Models from the hub").
    teacher: str
    # The student's base model, given the same way.
    student: str
    # Attention kernel of every model a job loads: sdpa (torch's, the default), eager, or
    # flash_attention_2 (CUDA with the flash-attn package; checked when the job starts).
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


@dataclass
class DataConfig:
    """Where each split's problems come from, the names of their fields, and how long a
    question may be.

    A split is a file (JSONL, JSON array, parquet, or a `datasets.save_to_disk` directory)
    or a named benchmark (`gsm8k`, `gsm8k:train`, `math500`, `svamp`; see distill.benchmarks),
    which brings its own field mapping. `benchmark` fills the splits left unset with that
    benchmark's splits. `train` is required unless `benchmark` provides it.
    """

    # The problems the teacher writes rationales for: a file or a benchmark split.
    train: str | None = None
    # Where UNDO mines the student's errors (undo.probe_split: validation).
    validation: str | None = None
    # The held-out problems every student is evaluated on (eval.split: test).
    test: str | None = None
    # The field of a user file that holds the question.
    question_field: str = "question"
    # The field that holds the gold answer: plain (51), GSM8K-style (... #### 51) or \boxed{}.
    answer_field: str = "answer"
    # The field that holds a problem's id (null: the line number).
    id_field: str | None = "id"
    # Use only the first this many training problems.
    train_limit: int | None = None
    # A benchmark (gsm8k, math500, svamp) whose splits fill those left unset.
    benchmark: str | None = None
    # auto: by suffix (.jsonl, .json, .parquet) or, for a directory, `datasets.load_from_disk`.
    format: Literal["auto", "jsonl", "json", "parquet", "datasets"] = "auto"
    # Fields of user files kept as per-problem metadata, so reports can group by them.
    meta_fields: list[str] = field(default_factory=list)
    # The longest question a model is given, in characters: a limit the login node can check
    # without loading a tokenizer. A question far past the model's context otherwise fails
    # deep inside a job, in an allocator error that names no record.
    max_question_chars: int = 8000
    # refuse: the start-up checks fail, naming the first longer question; skip: longer
    # questions are left out of every split that feeds a model, the same way in every job.
    too_long: Literal["refuse", "skip"] = "refuse"
    # Training and probe problems that are near-copies of a held-out problem (at least
    # decontaminate_share of their normalised word 8-grams found in one held-out problem): warn
    # (one line per split at start-up), drop (left out of generation and mining, the same way in
    # every job), or refuse the run.
    decontaminate: Literal["warn", "drop", "refuse"] = "warn"
    # How much of a problem's 8-grams one held-out problem must contain for it to count as a
    # copy. open-r1's rule, any shared 8-gram, is a share just above 0; it flags most problems of
    # templated sets (SVAMP, the demo) whose wording repeats with other numbers.
    decontaminate_share: float = 0.8


@dataclass
class PromptConfig:
    """How a question becomes the prompt the teacher and the student answer."""

    # The prompt, with the question in its {question} slot.
    template: str = "Question: {question}\nAnswer: "
    # Applied only when the tokenizer ships a chat template.
    use_chat_template: bool = True
    # Extra arguments of the chat template, e.g. {enable_thinking: false} for Qwen3.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationConfig:
    """Teacher generation. `temperature: 0` means greedy decoding. The engine settings
    (backend, tensor_parallel_size, gpu_memory_utilization) are the teacher's wherever it runs,
    its evaluation included; the student's are under `eval`."""

    # The engine: transformers (runs wherever torch does) or vllm (continuous batching).
    backend: Literal["transformers", "vllm"] = "transformers"
    # Samples per problem (more than 1 needs temperature > 0).
    n: int = 1
    # Sampling temperature; 0 is greedy.
    temperature: float = 0.0
    # Nucleus sampling: the smallest set of tokens with this much probability.
    top_p: float = 1.0
    # The longest rationale, in tokens.
    max_new_tokens: int = 256
    # Prompts per generate call (vLLM takes larger chunks of prompts per call).
    batch_size: int = 16
    # Shards the problems are cut into: one job (array task) each.
    num_shards: int = 1
    # Sampling seed; a problem's samples depend on it and the problem, not on the shard.
    seed: int = 0
    # vLLM only: GPUs per model replica.
    tensor_parallel_size: int = 1
    # vLLM only: top-k logprobs kept per generated token (0 = none).
    logprobs: int = 0
    # vLLM on a GPU: the share of the GPU's memory the engine may take.
    gpu_memory_utilization: float = 0.9
    # The precision the teacher computes in, on either backend: auto is bf16 on GPUs that have
    # it, fp16 on older ones, fp32 on a CPU.
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # vLLM's KV cache in GiB; when set it replaces gpu_memory_utilization. Without a GPU vLLM
    # reads gpu_memory_utilization as a share of host RAM, so there the cache is 1 GiB unless set.
    kv_cache_gib: float | None = None


@dataclass
class VerifyConfig:
    """Which verified (correct) rationales reach the training set.

    `median_tokens` keeps those no longer than the median length of all verified rationales
    (shorter rationales train students that answer in fewer tokens); `problem_median_tokens`
    takes the median per problem, so no solved problem loses all its rationales.
    """

    # Which correct rationales are kept: all, or those no longer than the median (overall or per problem).
    filter: Literal["none", "median_tokens", "problem_median_tokens"] = "none"
    # Fewer kept rationales than this is a warning in the driver's output and the report (a
    # student trained on a handful of examples says little); none at all stops the iteration
    # before training is submitted.
    min_rationales: int = 32


@dataclass
class EvalConfig:
    """Greedy answers of the student on the held-out split (and, in UNDO, the probe split).
    The engine keys are the student's: the teacher keeps `generation`'s when it is evaluated."""

    # The held-out split every student is evaluated on.
    split: Literal["train", "validation", "test"] = "test"
    # Evaluate on the first this many problems only.
    limit: int | None = None
    # The longest answer, in tokens.
    max_new_tokens: int = 256
    # Prompts per generate call.
    batch_size: int = 16
    # Shards per evaluated model: one job (array task) each.
    num_shards: int = 1
    # Iteration 0 also evaluates the teacher and the untrained student, for reference.
    baselines: bool = True
    # The student's engine (null: generation.backend).
    backend: Literal["transformers", "vllm"] | None = None
    # vLLM only: GPUs per student replica.
    tensor_parallel_size: int = 1
    # vLLM on a GPU: the share of the GPU's memory the student's engine may take.
    gpu_memory_utilization: float = 0.9
    # The student's precision (null: generation.dtype).
    dtype: Literal["auto", "bf16", "fp16", "fp32"] | None = None
    # The student's vLLM KV cache in GiB (see generation.kv_cache_gib).
    kv_cache_gib: float | None = None


DEFAULT_UNDO_TEMPLATE = (
    "Question: {question}\nPrevious answer: {previous}\nStudent answer: {student_answer}\n"
    "Verdict: {verdict}\nAnswer: "
)


@dataclass
class UndoConfig:
    """Iterations >= 1: mine the student's errors, have the teacher answer them again, retrain.

    Whether only failed problems are regenerated, whether data accumulates and when to stop
    are not pinned down by the paper, so each is a setting here.
    """

    # Where errors are mined: the paper diagnoses on a validation split.
    probe_split: Literal["train", "validation"] = "validation"
    # Probe only the first this many problems of the probe split.
    probe_limit: int | None = None
    # Slots: {question}, {previous} (the teacher's earlier rationale or "none"),
    # {student_answer}, {verdict}.
    template: str = DEFAULT_UNDO_TEMPLATE
    # The teacher's samples per mined error.
    n: int = 4
    # Their sampling temperature.
    temperature: float = 0.7
    # accumulate: D_N = D_{N-1} + new; replace: new rationales replace a problem's old ones.
    dataset: Literal["accumulate", "replace"] = "accumulate"
    # At most this many rationales per problem in the training set.
    cap_per_problem: int = 4
    # base: retrain the student from the base model each iteration (as in the paper).
    # previous: continue from the last iteration's student.
    init: Literal["base", "previous"] = "base"
    # `make undo` runs iterations 1..max_iters at most.
    max_iters: int = 3
    # ... and stops after this many iterations in a row without a better held-out accuracy.
    patience: int = 1
    # The objective iterations 1+ train with (e.g. onpolicy after an sft iteration 0, as Qwen3's
    # small models were made); null: train.objective. Its own settings are train's.
    objective: str | None = None
    # The share of the prompts an objective that draws its own (onpolicy) takes from this
    # iteration's mined errors, the student's failures (1: only them; 0: the whole training set,
    # as in iteration 0). The rest of each draw is the training set's.
    onpolicy_errors: float = 0.0


@dataclass
class RunConfig:
    # The run's name: its directory is run_root/name.
    name: str
    models: ModelsConfig
    data: DataConfig
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    undo: UndoConfig = field(default_factory=UndoConfig)
    # Where run directories are made.
    run_root: str = "runs"
    # `soft` for filesystems without working flock (e.g. Lustre mounted without -o flock).
    lock: Literal["flock", "soft"] = "flock"
    # Modules imported whenever this config loads, in every process of the run: a module that
    # registers a stage (distill.pipeline.register) adds it to the plans, on every launcher.
    plugins: list[str] = field(default_factory=list)
    source: str = field(default="", metadata={"internal": True})

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    def hash(self) -> str:
        """Content hash of the resolved config: a changed config is a different experiment."""
        canon = json.dumps(_hashed(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


# Keys left out of the config hash while at their default: each came after runs had been started
# without it, and those runs' recorded hashes must keep matching their unchanged configs. Set to
# anything else, they count like every other key. A key added to the schema joins this list
# (tests/test_benchmarks.py holds the hash of a config at its defaults).
UNHASHED_AT_DEFAULT = frozenset({
    "models.attn_implementation", "data.benchmark", "data.format", "data.meta_fields", "data.max_question_chars",
    "data.too_long", "prompt.chat_template_kwargs", "generation.tensor_parallel_size", "generation.logprobs",
    "generation.gpu_memory_utilization", "generation.dtype", "generation.kv_cache_gib", "verify",
    "verify.min_rationales", "train.kd", "train.feature", "train.quantize", "train.packing", "train.precision",
    "train.gradient_checkpointing", "train.loss_chunk", "train.distributed", "eval.backend",
    "eval.tensor_parallel_size", "eval.gpu_memory_utilization", "eval.dtype", "eval.kv_cache_gib", "plugins",
    "train.report_to", "data.decontaminate", "data.decontaminate_share", "train.onpolicy", "undo.objective",
    "undo.onpolicy_errors", "train.onpolicy.ce_weight",
    "train.onpolicy.sampler", "train.onpolicy.kv_cache_gib", "train.onpolicy.context",
})


def _hashed(obj: Any, prefix: str = "") -> Any:
    """The config as hashed: like `to_dict`, less the `UNHASHED_AT_DEFAULT` keys at their default."""
    if not dataclasses.is_dataclass(obj):
        return obj
    out = {}
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if f.metadata.get("internal") or (key in UNHASHED_AT_DEFAULT and value == _default_of(f)):
            continue
        out[f.name] = _hashed(value, key + ".")
    return out


# Keys a started run may change: they decide how far the run goes or how much memory its
# engines take, never what a finished stage wrote. A change is recorded in the manifest's history.
MUTABLE_KEYS = ("undo.max_iters", "undo.patience", "eval.batch_size", "eval.gpu_memory_utilization",
                "generation.gpu_memory_utilization", "train.report_to")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1}}` -> `{"train.lr": 1}` (lists stay whole values)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Key path -> (old value, new value) for every value that differs."""
    a, b = flatten(old.to_dict()), flatten(new.to_dict())
    missing = object()
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k, missing) != b.get(k, missing)}


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a YAML config; `overrides` are `key.path=value` strings."""
    path = Path(path)
    raw = read_yaml_mapping(path)
    items = overrides or []
    pairs = parse_overrides(items, schema=RunConfig)
    for key, value in pairs:
        set_path(raw, key, value, f"{path} (--set)")
    cfg = from_mapping(RunConfig, raw, f"{path}: ")
    cfg.source = str(path)
    labels = tuple((key, override_label(item)) for (key, _), item in zip(pairs, items, strict=True))
    _check_values(cfg, Origin(str(path), labels))
    import_plugins(cfg.plugins, Origin(str(path), labels))
    return cfg


def import_plugins(modules: list[str], at: Origin) -> None:
    """Import the config's `plugins` (each once per process; importing registers their stages)."""
    import importlib

    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name):
                raise
            raise ConfigError(f"{at('plugins')}[{i}]: no module {name!r} to import") from None


@dataclass(frozen=True)
class Origin:
    """The start of an error about a key: `file: key`, or `--set item: key` when the key's value
    came from an override, so the user edits the command line rather than a correct file."""

    path: str
    # (key path, how errors name the override), in the order they were applied.
    overrides: tuple[tuple[str, str], ...] = ()

    def __call__(self, key: str, *also: str) -> str:
        """Name `key`, blaming the last override that set it, a mapping above it, or one of the
        `also` keys that the same constraint reads."""
        for dotted, label in reversed(self.overrides):
            if any(k == dotted or k.startswith(dotted + ".") for k in (key, *also)):
                return f"{label}: {key}"
        return f"{self.path}: {key}"


@dataclass(frozen=True)
class Range:
    """The values a numeric key allows: `low` and `high` (None: unbounded), each included unless
    its `*_open` is set. A float must be finite besides: inf and nan slip past one-sided
    comparisons (`lr <= 0` is false for both) and fail later, deep in a job."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    unit: str = ""

    def admits(self, value: float) -> bool:
        """Whether `value` lies in the range (an int of any size is compared exactly)."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, is_float: bool) -> str:
        """The range as an error states it: `>= 1`, `> 0 and finite`, `in (0, 1]`."""
        unit = f" {self.unit}" if self.unit else ""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{self.low}, {self.high}{right}{unit}"
        if self.low is not None:
            bound = f"{'>' if self.low_open else '>='} {self.low}"
        else:
            bound = f"{'<' if self.high_open else '<='} {self.high}"
        return bound + unit + (" and finite" if is_float else "")


AT_LEAST_1 = Range(1)
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
ZERO_TO_ONE = Range(0, 1)
SHARE = Range(0, 1, low_open=True)
SEED = Range(0, 2**32 - 1)  # numpy refuses a negative seed, torch one of 2**64 or more
KV_CACHE = Range(0, 1_000_000, low_open=True, high_open=True, unit="GiB")

# Every numeric key of the run config and the values it allows; a key left unset (None) is not
# checked. Constraints between keys, and of one objective only, are in `_check_values` and
# `check_train`.
RANGES: tuple[tuple[str, Range], ...] = (
    ("data.train_limit", AT_LEAST_1),
    ("data.max_question_chars", AT_LEAST_1),
    ("data.decontaminate_share", SHARE),
    ("generation.n", AT_LEAST_1),
    ("generation.temperature", NON_NEGATIVE),
    ("generation.top_p", SHARE),
    ("generation.max_new_tokens", AT_LEAST_1),
    ("generation.batch_size", AT_LEAST_1),
    ("generation.num_shards", AT_LEAST_1),
    ("generation.seed", SEED),
    ("generation.tensor_parallel_size", AT_LEAST_1),
    ("generation.logprobs", NON_NEGATIVE),
    ("generation.gpu_memory_utilization", SHARE),
    ("generation.kv_cache_gib", KV_CACHE),
    ("verify.min_rationales", NON_NEGATIVE),
    ("train.lr", POSITIVE),
    ("train.epochs", POSITIVE),
    ("train.max_steps", AT_LEAST_1),
    ("train.batch_size", AT_LEAST_1),
    ("train.grad_accum", AT_LEAST_1),
    ("train.max_length", Range(2)),  # at least one prompt token and one completion token
    ("train.warmup_ratio", ZERO_TO_ONE),
    ("train.weight_decay", NON_NEGATIVE),
    ("train.save_steps", AT_LEAST_1),
    ("train.keep_checkpoints", AT_LEAST_1),
    ("train.log_steps", AT_LEAST_1),
    ("train.onpolicy.lmbda", ZERO_TO_ONE),
    ("train.onpolicy.beta", ZERO_TO_ONE),
    ("train.onpolicy.temperature", POSITIVE),
    ("train.onpolicy.max_new_tokens", AT_LEAST_1),
    ("train.onpolicy.ce_weight", ZERO_TO_ONE),
    ("train.onpolicy.kv_cache_gib", POSITIVE),
    ("train.seed", SEED),
    ("train.loss_chunk", AT_LEAST_1),
    ("train.lora.r", AT_LEAST_1),
    ("train.lora.alpha", AT_LEAST_1),
    ("train.lora.dropout", Range(0, 1, high_open=True)),
    ("train.kd.beta", ZERO_TO_ONE),
    ("train.kd.temperature", POSITIVE),
    ("train.kd.alpha", ZERO_TO_ONE),
    ("train.kd.top_k", AT_LEAST_1),
    ("train.kd.top_k_percent", SHARE),
    ("train.feature.alpha", ZERO_TO_ONE),
    ("eval.limit", AT_LEAST_1),
    ("eval.max_new_tokens", AT_LEAST_1),
    ("eval.batch_size", AT_LEAST_1),
    ("eval.num_shards", AT_LEAST_1),
    ("eval.tensor_parallel_size", AT_LEAST_1),
    ("eval.gpu_memory_utilization", SHARE),
    ("eval.kv_cache_gib", KV_CACHE),
    ("undo.probe_limit", AT_LEAST_1),
    ("undo.n", AT_LEAST_1),
    ("undo.temperature", NON_NEGATIVE),
    ("undo.cap_per_problem", AT_LEAST_1),
    ("undo.onpolicy_errors", ZERO_TO_ONE),
    ("undo.max_iters", AT_LEAST_1),
    ("undo.patience", AT_LEAST_1),
)

# Template keys and the slot each must contain: without it the model never sees the question
# (or, for context distillation, the student's prompt).
SLOTS: tuple[tuple[str, str], ...] = (
    ("prompt.template", "question"),
    ("undo.template", "question"),
    ("train.kd.context_template", "prompt"),
)


def value_at(cfg: Any, dotted: str) -> Any:
    """The value at a dotted key path of a config dataclass."""
    return functools.reduce(getattr, dotted.split("."), cfg)


def check_ranges(cfg: RunConfig, origin: Origin) -> None:
    """Refuse the first numeric key outside its `RANGES` entry, or a template without its slot."""
    for key, allowed in RANGES:
        value = value_at(cfg, key)
        if value is not None and not allowed.admits(value):
            raise ConfigError(f"{origin(key)}: must be {allowed.describe(isinstance(value, float))}, got {value}")
    for key, slot in SLOTS:
        if f"{{{slot}}}" not in value_at(cfg, key):
            raise ConfigError(f"{origin(key)}: must contain the {{{slot}}} slot")
    # Filled with str.format: an unknown slot or a lone brace would fail inside the training job.
    if _format_slots(cfg.train.kd.context_template) != {"prompt"}:
        raise ConfigError(f"{origin('train.kd.context_template')}: must be a str.format template whose only slot "
                          "is {prompt} (write {{ and }} for literal braces)")


def _format_slots(template: str) -> set[str] | None:
    """The slot names of a str.format template, or None where it does not parse."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError:
        return None


def _check_values(cfg: RunConfig, origin: Origin) -> None:
    """Constraints a type cannot express."""
    # The name becomes a directory and part of every job's name and script: a plain name only.
    check_name(cfg.name, origin("name"))
    for key, value in (("run_root", cfg.run_root), ("models.teacher", cfg.models.teacher),
                       ("models.student", cfg.models.student),
                       *((f"data.{s}", getattr(cfg.data, s)) for s in ("train", "validation", "test"))):
        if value is not None:
            check_one_line(value, origin(key))
    if "%" in cfg.run_root:
        # submitit expands %j, %A, %a in its log folder, which lies under the run directory.
        raise ConfigError(f"{origin('run_root')}: contains '%' ({cfg.run_root!r}); job logs would be written outside "
                          "the run, in a folder per job id: use a plain path")
    check_ranges(cfg, origin)
    for section, n, temperature in (("generation", cfg.generation.n, cfg.generation.temperature),
                                    ("undo", cfg.undo.n, cfg.undo.temperature)):
        if n > 1 and temperature == 0:
            raise ConfigError(f"{origin(f'{section}.n', f'{section}.temperature')}: {n} samples at temperature 0 "
                              f"would be {n} copies of the greedy answer; set {section}.temperature > 0 or "
                              f"{section}.n: 1")
    _resolve_benchmark(cfg, origin)
    check_train(cfg.train, origin)
    if cfg.undo.objective is not None:
        check_train(undo_train(cfg), origin)
    if cfg.undo.onpolicy_errors > 0 and not objectives.build(undo_train(cfg)).draws_examples():
        raise ConfigError(f"{origin('undo.onpolicy_errors', 'undo.objective')}: objective {undo_train(cfg).objective} "
                          "trains on the rationales as they are and draws no prompts; set undo.objective: onpolicy")
    if getattr(cfg.data, cfg.eval.split) is None:
        raise ConfigError(f"{origin('eval.split', f'data.{cfg.eval.split}')}: data.{cfg.eval.split} is not set")


def undo_train(cfg: RunConfig) -> TrainConfig:
    """The train settings of iterations 1+: train's, with `undo.objective` where it is set."""
    if cfg.undo.objective is None:
        return cfg.train
    return dataclasses.replace(cfg.train, objective=cfg.undo.objective)


def iteration_train(cfg: RunConfig, it: int) -> TrainConfig:
    """The train settings iteration `it`'s student is trained with."""
    return cfg.train if it == 0 else undo_train(cfg)


REPORT_TO = ("tensorboard",)  # where train.report_to may send the logged steps


def check_train(t: TrainConfig, where: str | Origin) -> None:
    """Objective settings that cannot work, refused before any job starts (`where`: the config
    file, or the `Origin` that also names overrides)."""
    at = where if isinstance(where, Origin) else Origin(where)
    try:
        objective = objectives.build(t)
    except DistillError as exc:
        raise ConfigError(f"{at('train.objective')}: {exc}") from None
    objective.check(at)
    unknown = [r for r in t.report_to if r not in REPORT_TO]
    if unknown:
        raise ConfigError(f"{at('train.report_to')}: unknown {unknown[0]!r} (known: {', '.join(REPORT_TO)})")
    if t.packing and not objective.packs:
        raise ConfigError(f"{at('train.packing', 'train.objective')}: objective {t.objective} does not train on "
                          "packed rows (sft does)")
    # Whether the job's machine has CUDA and bitsandbytes is checked when the job starts
    # (distill.device): the login node that loads this config usually has no GPU.
    if t.quantize == "4bit" and not t.lora.enabled:
        raise ConfigError(f"{at('train.quantize', 'train.lora')}: 4bit trains LoRA adapters; "
                          "set train.lora.enabled: true")
    if t.distributed == "fsdp" and t.quantize == "4bit":
        raise ConfigError(f"{at('train.distributed', 'train.quantize')}: fsdp cannot shard 4-bit (QLoRA) weights; "
                          "use ddp, or quantize: none")
    if t.distributed == "fsdp" and t.precision == "fp16":
        raise ConfigError(f"{at('train.distributed', 'train.precision')}: fsdp with fp16 loss scaling is not supported "
                          "(the scaler sees only this rank's shard of the gradients); use bf16 (or auto on bf16 GPUs), "
                          "or ddp")
    if t.lora.enabled and "lm_head" in t.lora.target_modules:
        raise ConfigError(f"{at('train.lora.target_modules', 'train.lora')}: lm_head cannot carry an adapter (the head "
                          "runs chunked with the loss)")


def _resolve_benchmark(cfg: RunConfig, origin: Origin) -> None:
    """Check benchmark names and fill the splits `data.benchmark` provides (in place, so the
    saved config and its hash name the exact sources)."""
    from distill.benchmarks import BENCHMARKS, find_benchmark, split_names

    data = cfg.data
    if data.benchmark is not None:
        if data.benchmark not in BENCHMARKS:
            raise ConfigError(f"{origin('data.benchmark')}: unknown benchmark {data.benchmark!r} "
                              f"(known: {', '.join(BENCHMARKS)})")
        for split in ("train", "validation", "test"):
            if getattr(data, split) is None and split in BENCHMARKS[data.benchmark]:
                setattr(data, split, f"{data.benchmark}:{split}")
    for split in ("train", "validation", "test"):
        value = getattr(data, split)
        if value is not None and ":" in value and value.split(":", 1)[0] in BENCHMARKS and not find_benchmark(value):
            raise ConfigError(f"{origin(f'data.{split}', 'data.benchmark')}: unknown benchmark split {value!r} "
                              f"(known: {', '.join(split_names())})")
    if data.train is None:
        extra = f" (benchmark {data.benchmark} has no train split)" if data.benchmark else ""
        raise ConfigError(f"{origin('data.train', 'data.benchmark')}: required key missing{extra}")
