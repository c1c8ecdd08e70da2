"""The run configuration: the schema (typed dataclasses), its hash, and the constraints on its
values that a type cannot express, checked before any job starts.

Every mistake is reported as one line naming the file and the key path, e.g.
`configs/tiny.yaml: train.lr: expected float, got 'fast'`, so a typo never costs a queue wait.
Reading YAML into the dataclasses is `distill.typed_yaml`'s; whether paths exist is checked by
`distill.preflight`, and what the job's hardware must offer by `distill.device` when it starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distill.errors import ConfigError
from distill.typed_yaml import (
    check_name,
    check_one_line,
    from_mapping,
    parse_overrides,
    read_yaml_mapping,
    set_path,
)

# Fields added after runs were started with configs that lack them. At their default they are
# left out of the config hash, so adding them does not make existing run directories refuse
# their own (unchanged) config; set to anything else they count like every other field.
COMPAT = {"compat": True}


def compat(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A field added later: see `COMPAT`."""
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=COMPAT)
    return field(default=default, metadata=COMPAT)


@dataclass
class ModelsConfig:
    """Local model directories (a hub id works only where the hub is reachable)."""

    teacher: str
    student: str
    # Attention kernel of every model a job loads: sdpa (torch's, the default), eager, or
    # flash_attention_2 (CUDA with the flash-attn package; checked when the job starts).
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = compat("sdpa")


@dataclass
class DataConfig:
    """Where each split's problems come from, the names of their fields, and how long a
    question may be.

    A split is a file (JSONL, JSON array, parquet, or a `datasets.save_to_disk` directory)
    or a named benchmark (`gsm8k`, `gsm8k:train`, `math500`, `svamp`; see distill.benchmarks),
    which brings its own field mapping. `benchmark` fills the splits left unset with that
    benchmark's splits. `train` is required unless `benchmark` provides it.
    """

    train: str | None = None
    validation: str | None = None
    test: str | None = None
    question_field: str = "question"
    answer_field: str = "answer"
    id_field: str | None = "id"
    train_limit: int | None = None
    benchmark: str | None = compat(None)
    # auto: by suffix (.jsonl, .json, .parquet) or, for a directory, `datasets.load_from_disk`.
    format: Literal["auto", "jsonl", "json", "parquet", "datasets"] = compat("auto")
    # Fields of user files kept as per-problem metadata, so reports can group by them.
    meta_fields: list[str] = compat(default_factory=list)
    # The longest question a model is given, in characters: a limit the login node can check
    # without loading a tokenizer. A question far past the model's context otherwise fails
    # deep inside a job, in an allocator error that names no record.
    max_question_chars: int = compat(8000)
    # refuse: the start-up checks fail, naming the first longer question; skip: longer
    # questions are left out of every split that feeds a model, the same way in every job.
    too_long: Literal["refuse", "skip"] = compat("refuse")


@dataclass
class PromptConfig:
    template: str = "Question: {question}\nAnswer: "
    # Applied only when the tokenizer ships a chat template.
    use_chat_template: bool = True
    # Extra arguments of the chat template, e.g. {enable_thinking: false} for Qwen3.
    chat_template_kwargs: dict[str, Any] = compat(default_factory=dict)


@dataclass
class GenerationConfig:
    """Teacher generation. `temperature: 0` means greedy decoding. The engine settings
    (backend, tensor_parallel_size, gpu_memory_utilization) are the teacher's wherever it runs,
    its evaluation included; the student's are under `eval`."""

    backend: Literal["transformers", "vllm"] = "transformers"
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 16
    num_shards: int = 1
    seed: int = 0
    # vLLM only: GPUs per model replica, and top-k logprobs kept per generated token (0 = none).
    tensor_parallel_size: int = compat(1)
    logprobs: int = compat(0)
    gpu_memory_utilization: float = compat(0.9)
    # The precision the teacher computes in, on either backend: auto is bf16 on GPUs that have
    # it, fp16 on older ones, fp32 on a CPU.
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = compat("auto")
    # vLLM's KV cache in GiB; when set it replaces gpu_memory_utilization. Without a GPU vLLM
    # reads gpu_memory_utilization as a share of host RAM, so there the cache is 1 GiB unless set.
    kv_cache_gib: float | None = compat(None)


@dataclass
class VerifyConfig:
    """Which verified (correct) rationales reach the training set.

    `median_tokens` keeps those no longer than the median length of all verified rationales
    (shorter rationales train students that answer in fewer tokens); `problem_median_tokens`
    takes the median per problem, so no solved problem loses all its rationales.
    """

    filter: Literal["none", "median_tokens", "problem_median_tokens"] = "none"


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class KDConfig:
    """The teacher signal of objectives `kd`, `ekd` and `context`: loss = (1 - alpha) * CE +
    alpha * T^2 * divergence(teacher || student) averaged over the selected completion positions.

    `teacher: online` keeps the teacher in memory (full vocabulary, any objective); `offline`
    runs the teacher once over the training set before the first step, stores its `top_k`
    logprobs per token beside the checkpoints and trains without it (kd and ekd only).
    """

    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    alpha: float = 0.5
    teacher: Literal["online", "offline"] = "online"
    top_k: int = 20
    # ekd: the top_k_percent highest-scoring completion positions of each sequence, or the
    # positions between two score percentiles (bucket: [70, 80]); score: whose entropy.
    top_k_percent: float | None = 0.2
    bucket: list[float] | None = None
    score: Literal["teacher_entropy", "student_entropy"] = "teacher_entropy"
    # context: the teacher's prompt, with the student's prompt in the {prompt} slot.
    context_template: str = "Solve step by step and end with the answer in \\boxed{{}}.\n{prompt}"


@dataclass
class FeatureConfig:
    """Objective `feature`: hidden-state matching through a learned linear projection
    (student width -> teacher width), one pair [student layer, teacher layer] per entry
    (hidden_states indices: 0 = embeddings, -1 = last layer), plus CE weighted 1 - alpha."""

    layers: list[list[int]] = field(default_factory=lambda: [[-1, -1]])
    loss: Literal["mse", "cosine"] = "mse"
    alpha: float = 0.5


@dataclass
class TrainConfig:
    """Student training; one optimizer step consumes `batch_size * grad_accum` examples."""

    objective: Literal["sft", "kd", "ekd", "context", "feature"] = "sft"
    lr: float = 2e-5
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 2048
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    save_steps: int = 100
    keep_checkpoints: int = 2
    log_steps: int = 10
    seed: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)
    kd: KDConfig = compat(default_factory=KDConfig)
    feature: FeatureConfig = compat(default_factory=FeatureConfig)
    # QLoRA: load the student in 4 bit (bitsandbytes, CUDA only) and train LoRA adapters on it.
    quantize: Literal["none", "4bit"] = compat("none")
    # Pack each micro-batch's examples into rows of up to max_length tokens (attention kept
    # within each example) instead of padding every example to the longest; sft only.
    packing: bool = compat(False)
    # auto: bf16 on GPUs that have it, fp16 with loss scaling on older GPUs, fp32 on the CPU.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = compat("auto")
    # Recompute each layer's activations in backward instead of keeping them (less memory,
    # about a third more compute).
    gradient_checkpointing: bool = compat(False)
    # Positions per chunk of the LM head and the loss: bounds the vocabulary-sized tensors.
    loss_chunk: int = compat(256)
    # Under torchrun, one process per GPU: ddp replicates the student, fsdp shards it (FSDP2, one
    # unit per decoder layer). Either way a step consumes the same batch as one process would
    # (distill.ranks); without torchrun the job runs as one process. The cluster profile's
    # nodes, tasks_per_node and gpus_per_node lay the ranks out (jobs.launch).
    distributed: Literal["none", "ddp", "fsdp"] = compat("none")


@dataclass
class EvalConfig:
    """Greedy answers of the student on the held-out split (and, in UNDO, the probe split).
    The engine keys are the student's: the teacher keeps `generation`'s when it is evaluated."""

    split: Literal["train", "validation", "test"] = "test"
    limit: int | None = None
    max_new_tokens: int = 256
    batch_size: int = 16
    num_shards: int = 1
    # Iteration 0 also evaluates the teacher and the untrained student, for reference.
    baselines: bool = True
    # The student's engine: backend (default: generation.backend), vLLM's tensor_parallel_size
    # and gpu_memory_utilization.
    backend: Literal["transformers", "vllm"] | None = compat(None)
    tensor_parallel_size: int = compat(1)
    gpu_memory_utilization: float = compat(0.9)
    # The student's precision (default: generation.dtype) and vLLM KV cache (see generation).
    dtype: Literal["auto", "bf16", "fp16", "fp32"] | None = compat(None)
    kv_cache_gib: float | None = compat(None)


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
    probe_limit: int | None = None
    # Slots: {question}, {previous} (the teacher's earlier rationale or "none"),
    # {student_answer}, {verdict}.
    template: str = DEFAULT_UNDO_TEMPLATE
    n: int = 4
    temperature: float = 0.7
    # accumulate: D_N = D_{N-1} + new; replace: new rationales replace a problem's old ones.
    dataset: Literal["accumulate", "replace"] = "accumulate"
    cap_per_problem: int = 4
    # base: retrain the student from the base model each iteration (as in the paper).
    init: Literal["base", "previous"] = "base"
    max_iters: int = 3
    patience: int = 1


@dataclass
class RunConfig:
    name: str
    models: ModelsConfig
    data: DataConfig
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    verify: VerifyConfig = compat(default_factory=VerifyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    undo: UndoConfig = field(default_factory=UndoConfig)
    run_root: str = "runs"
    # `soft` for filesystems without working flock (e.g. Lustre mounted without -o flock).
    lock: Literal["flock", "soft"] = "flock"
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


def _hashed(obj: Any) -> Any:
    """The config as hashed: like `to_dict`, less the `compat` fields still at their default."""
    if not dataclasses.is_dataclass(obj):
        return obj
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("internal") or (f.metadata.get("compat") and value == _default_of(f)):
            continue
        out[f.name] = _hashed(value)
    return out


# Keys a started run may change: they decide how far the run goes or how much memory its
# engines take, never what a finished stage wrote. A change is recorded in the manifest's history.
MUTABLE_KEYS = ("undo.max_iters", "undo.patience", "eval.batch_size", "eval.gpu_memory_utilization",
                "generation.gpu_memory_utilization")


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
    for key, value in parse_overrides(overrides or [], schema=RunConfig):
        set_path(raw, key, value, f"{path} (--set)")
    cfg = from_mapping(RunConfig, raw, f"{path}: ")
    cfg.source = str(path)
    _check_values(cfg)
    return cfg


def _check_values(cfg: RunConfig) -> None:
    """Constraints a type cannot express."""
    where = cfg.source
    # The name becomes a directory and part of every job's name and script: a plain name only.
    check_name(cfg.name, f"{where}: name")
    for key, value in (("run_root", cfg.run_root), ("models.teacher", cfg.models.teacher),
                       ("models.student", cfg.models.student),
                       *((f"data.{s}", getattr(cfg.data, s)) for s in ("train", "validation", "test"))):
        if value is not None:
            check_one_line(value, f"{where}: {key}")
    positive = {
        "generation.n": cfg.generation.n,
        "generation.max_new_tokens": cfg.generation.max_new_tokens,
        "generation.batch_size": cfg.generation.batch_size,
        "generation.num_shards": cfg.generation.num_shards,
        "data.max_question_chars": cfg.data.max_question_chars,
        "train.batch_size": cfg.train.batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "train.max_length": cfg.train.max_length,
        "train.save_steps": cfg.train.save_steps,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "eval.max_new_tokens": cfg.eval.max_new_tokens,
        "eval.batch_size": cfg.eval.batch_size,
        "eval.num_shards": cfg.eval.num_shards,
        "generation.tensor_parallel_size": cfg.generation.tensor_parallel_size,
        "eval.tensor_parallel_size": cfg.eval.tensor_parallel_size,
        "train.loss_chunk": cfg.train.loss_chunk,
        "undo.n": cfg.undo.n,
        "undo.cap_per_problem": cfg.undo.cap_per_problem,
        "undo.max_iters": cfg.undo.max_iters,
        "undo.patience": cfg.undo.patience,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{where}: {key}: must be >= 1, got {value}")
    if cfg.train.lr <= 0:
        raise ConfigError(f"{where}: train.lr: must be > 0, got {cfg.train.lr}")
    if cfg.generation.temperature < 0:
        raise ConfigError(f"{where}: generation.temperature: must be >= 0, got {cfg.generation.temperature}")
    if not 0 < cfg.generation.top_p <= 1:
        raise ConfigError(f"{where}: generation.top_p: must be in (0, 1], got {cfg.generation.top_p}")
    if cfg.generation.logprobs < 0:
        raise ConfigError(f"{where}: generation.logprobs: must be >= 0, got {cfg.generation.logprobs}")
    for section, n, temperature in (("generation", cfg.generation.n, cfg.generation.temperature),
                                    ("undo", cfg.undo.n, cfg.undo.temperature)):
        if n > 1 and temperature == 0:
            raise ConfigError(f"{where}: {section}.n: {n} samples at temperature 0 would be {n} copies of the "
                              f"greedy answer; set {section}.temperature > 0 or {section}.n: 1")
    for key, value in (("generation", cfg.generation.gpu_memory_utilization), ("eval", cfg.eval.gpu_memory_utilization)):
        if not 0 < value <= 1:
            raise ConfigError(f"{where}: {key}.gpu_memory_utilization: must be in (0, 1], got {value}")
    for key, gib in (("generation", cfg.generation.kv_cache_gib), ("eval", cfg.eval.kv_cache_gib)):
        if gib is not None and not 0 < gib < 1e6:
            raise ConfigError(f"{where}: {key}.kv_cache_gib: must be a positive number of GiB, got {gib}")
    _resolve_benchmark(cfg)
    check_train(cfg.train, where)
    if "{question}" not in cfg.prompt.template:
        raise ConfigError(f"{where}: prompt.template: must contain the {{question}} slot")
    if getattr(cfg.data, cfg.eval.split) is None:
        raise ConfigError(f"{where}: eval.split: data.{cfg.eval.split} is not set")


def check_train(t: TrainConfig, where: str) -> None:
    """Objective settings that cannot work, refused before any job starts."""
    kd = t.kd
    if kd.temperature <= 0:
        raise ConfigError(f"{where}: train.kd.temperature: must be > 0, got {kd.temperature}")
    for key, value in (("train.kd.alpha", kd.alpha), ("train.kd.beta", kd.beta), ("train.feature.alpha", t.feature.alpha)):
        if not 0 <= value <= 1:
            raise ConfigError(f"{where}: {key}: must be in [0, 1], got {value}")
    if kd.top_k < 1:
        raise ConfigError(f"{where}: train.kd.top_k: must be >= 1")
    if t.objective == "ekd":
        if (kd.top_k_percent is None) == (kd.bucket is None):
            raise ConfigError(f"{where}: train.kd: ekd needs exactly one of top_k_percent and bucket")
        if kd.bucket is not None and not (len(kd.bucket) == 2 and 0 <= kd.bucket[0] < kd.bucket[1] <= 100):
            raise ConfigError(f"{where}: train.kd.bucket: expected [lower, upper] percentiles, 0 <= lower < upper <= 100, got {kd.bucket}")
        if kd.bucket is None and not 0 < kd.top_k_percent <= 1:
            raise ConfigError(f"{where}: train.kd.top_k_percent: must be in (0, 1], got {kd.top_k_percent}")
    if t.objective == "context" and kd.teacher == "offline":
        raise ConfigError(f"{where}: train.kd.teacher: context distillation needs the teacher online")
    if t.objective == "context" and "{prompt}" not in kd.context_template:
        raise ConfigError(f"{where}: train.kd.context_template: must contain the {{prompt}} slot")
    if t.objective == "feature" and not t.feature.layers:
        raise ConfigError(f"{where}: train.feature.layers: give at least one [student, teacher] pair")
    if t.packing and t.objective != "sft":
        raise ConfigError(f"{where}: train.packing: only with objective sft (got {t.objective})")
    # Whether the job's machine has CUDA and bitsandbytes is checked when the job starts
    # (distill.device): the login node that loads this config usually has no GPU.
    if t.quantize == "4bit" and not t.lora.enabled:
        raise ConfigError(f"{where}: train.quantize: 4bit trains LoRA adapters; set train.lora.enabled: true")
    if t.distributed == "fsdp" and t.quantize == "4bit":
        raise ConfigError(f"{where}: train.distributed: fsdp cannot shard 4-bit (QLoRA) weights; use ddp, or quantize: none")
    if t.distributed == "fsdp" and t.precision == "fp16":
        raise ConfigError(f"{where}: train.distributed: fsdp with fp16 loss scaling is not supported (the scaler sees "
                          "only this rank's shard of the gradients); use bf16 (or auto on bf16 GPUs), or ddp")
    if t.lora.enabled and "lm_head" in t.lora.target_modules:
        raise ConfigError(f"{where}: train.lora.target_modules: lm_head cannot carry an adapter (the head runs "
                          "chunked with the loss)")


def _resolve_benchmark(cfg: RunConfig) -> None:
    """Check benchmark names and fill the splits `data.benchmark` provides (in place, so the
    saved config and its hash name the exact sources)."""
    from distill.benchmarks import BENCHMARKS, find_benchmark, split_names

    where, data = cfg.source, cfg.data
    if data.benchmark is not None:
        if data.benchmark not in BENCHMARKS:
            raise ConfigError(f"{where}: data.benchmark: unknown benchmark {data.benchmark!r} "
                              f"(known: {', '.join(BENCHMARKS)})")
        for split in ("train", "validation", "test"):
            if getattr(data, split) is None and split in BENCHMARKS[data.benchmark]:
                setattr(data, split, f"{data.benchmark}:{split}")
    for split in ("train", "validation", "test"):
        value = getattr(data, split)
        if value is not None and ":" in value and value.split(":", 1)[0] in BENCHMARKS and not find_benchmark(value):
            raise ConfigError(f"{where}: data.{split}: unknown benchmark split {value!r} (known: {', '.join(split_names())})")
    if data.train is None:
        extra = f" (benchmark {data.benchmark} has no train split)" if data.benchmark else ""
        raise ConfigError(f"{where}: data.train: required key missing{extra}")
