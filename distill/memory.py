"""Will it fit? The per-GPU memory of each stage of a run, from the models' config.json alone.

A job that runs out of GPU memory fails after its queue wait, so this answers on the login node,
before anything is submitted, without loading a weight: the shapes come from config.json
(`AutoConfig`, a local directory or a hub ID already in the cache) and the exact parameter
counts from the model built on the meta device, which takes seconds and allocates nothing.

The training estimate follows what distill's own training loop allocates (`distill.modeling`,
`distill.training`, `distill.chunked`), not a generic recipe:

- A full fine-tune keeps float32 weights whatever `train.precision` is (`student_dtype`: they
  are the optimizer's master copy) and computes under bf16/fp16 autocast, which keeps a bf16
  copy of every decoder weight it casts until backward. LoRA keeps the base in the compute
  dtype and float32 adapters; QLoRA the decoder's Linear weights in 4-bit NF4 with double
  quantisation (about 0.516 bytes per parameter) and, as peft's `prepare_model_for_kbit_training`
  does, everything else (embeddings, head, norms) in float32.
- Gradients are float32 for the parameters that train; fused AdamW keeps two float32 moments
  per trained parameter (16 bytes per parameter for a full fine-tune, with the weights).
- Activations: `layer_activation_bytes` below, per token and decoder layer. The LM head runs
  with the loss `train.loss_chunk` positions at a time; for a trained head its float32
  gradient exists from the forward pass on.
- The peak is the larger of two moments: the end of the forward pass (activations, weight
  copies, the head's gradient and the loss chunk alive; with `grad_accum` > 1 the gradients
  of the earlier micro-batches too) and the end of the backward pass (every gradient).

Sizes are in GB (10^9 bytes), the unit GPUs are sold in. A GPU's capacity is its nominal size,
which is less than CUDA reports for it (an 80 GB H100 shows about 79 GiB, 85·10^9 bytes): the
difference is left as margin for the caching allocator's fragmentation, which is not modelled.
1 GiB is set aside for the CUDA context (kernels, cuBLAS workspace).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill import objectives
from distill.config import RunConfig
from distill.errors import DistillError
from distill.train_config import TrainConfig

GB = 1e9
CUDA_CONTEXT = 2**30
# NF4 with double quantisation: 4 bits, plus an 8-bit absmax per 64 weights, plus a float32
# constant per 256 of those.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# Live [loss_chunk, vocabulary] float32 buffers at the chunked loss's peak, measured with
# bench/loss_memory.py (docs/performance.md): cross-entropy writes its gradient over the logits
# but the previous chunk's gradient is still referenced when the next logits are made (2);
# full-vocabulary KD takes its gradient through autograd (9); offline top-k KD (6).
# The cluster-profile sections whose GPUs the plan covers: training, the teacher's generation,
# and evaluation (the student's, mining's and, in iteration 0, the teacher's).
PLANNED_SECTIONS = ("train", "generate", "evaluate")
CHUNK_BUFFERS = {"ce": 2, "kd": 9, "kd_offline": 6}
# Characters per token when a prompt's length is known only in characters: Qwen's tokenizer
# averages 3-4 on English math text (every digit is a token); 3 errs on the long side.
CHARS_PER_TOKEN = 3
# Nominal memory per GPU type, GB. A100 and V100 come in two sizes: the larger is assumed unless
# the type names the smaller (a100-40, v100-16, ...).
GPU_GB = {"h200": 141, "h100nvl": 94, "h100": 80, "a100": 80, "l40s": 48, "l40": 48, "a40": 48, "a6000": 48,
          "v100": 32, "a10": 24, "l4": 24}
SMALLER = {"a100": 40, "v100": 16}
DEFAULT_GPU_GB = 80


# -- the models ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What a model's memory depends on: its config.json, and the parameter counts of the
    model built from it on the meta device (exact, tied embeddings counted once)."""

    ref: str
    model_type: str
    params: int
    embedding: int  # input embedding (vocab × hidden)
    head: int  # a separate output head; 0 when tied to the embedding
    linear: int  # weights of every Linear but the head: what autocast copies and 4-bit quantises
    linears: tuple[tuple[str, int, int], ...]  # (module name, in, out) of those Linears
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def tied(self) -> bool:
        return self.head == 0

    @property
    def attention(self) -> int:
        return self.heads * self.head_dim

    def lora_params(self, targets: list[str], r: int) -> int:
        """Adapter parameters peft adds: r·(in + out) per Linear whose name is, or ends with, a target."""
        return sum(r * (i + o) for name, i, o in self.linears
                   if any(name == t or name.endswith("." + t) for t in targets))


def read_shape(ref: str, where: str = "model") -> ModelShape:
    """The shape of the model at `ref`: a directory with config.json, or a hub ID whose config
    is already in the Hugging Face cache (nothing is downloaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.hub import hub_id

    match = hub_id(ref)
    if match is None and not (Path(ref) / "config.json").is_file():
        raise DistillError(f"{where}: {ref}: no config.json there (the plan reads only a model's config.json)")
    try:
        if match is None:
            config = AutoConfig.from_pretrained(ref)
        else:
            config = AutoConfig.from_pretrained(match["repo"], revision=match["rev"], local_files_only=True)
    except OSError:
        raise DistillError(f"{where}: {ref}: no such directory, and no config.json for it in the Hugging Face cache "
                           f"(the plan downloads nothing: `hf download {match['repo'] if match else ref} config.json` "
                           "first, or give a directory)") from None
    except ValueError as exc:
        raise DistillError(f"{where}: {ref}: config.json not understood: {str(exc).splitlines()[0]}") from None
    text = getattr(config, "get_text_config", lambda: config)()
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # whatever fails here, the config.json is the cause
        raise DistillError(f"{where}: {ref}: cannot build {config.model_type} from its config.json: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings().weight
    tied = head is not None and head.weight is embedding
    linears = tuple((n, m.in_features, m.out_features) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not head)
    heads = text.num_attention_heads
    return ModelShape(
        ref=ref, model_type=config.model_type, params=sum(p.numel() for p in model.parameters()),
        embedding=embedding.numel(), head=0 if tied or head is None else head.weight.numel(),
        linear=sum(i * o for _, i, o in linears), linears=linears, hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size, layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=text.vocab_size)


# -- GPUs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    name: str
    gb: float
    count: int = 1  # GPUs a job of the stage is given (gres)
    source: str = "default"

    @property
    def bytes(self) -> float:
        return self.gb * GB


def gpu_type(name: str) -> tuple[float, str]:
    """Nominal GB of a GPU type as SLURM names it (H100, a100-40, v100_16gb...), and a note when
    it was assumed."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    for family, gb in GPU_GB.items():  # longer names first where one contains another (h100nvl, l40s)
        if key.startswith(family):
            rest = key[len(family):]
            named = re.match(r"(sxm\d?|pcie)?(\d+)", rest)
            if family in SMALLER and named and int(named.group(2)) == SMALLER[family]:
                return SMALLER[family], ""
            if family in SMALLER and not (named and int(named.group(2)) == gb):
                return gb, (f"{name}: taken as the {gb} GB model "
                            f"(the {SMALLER[family]} GB one: name it {family}-{SMALLER[family]})")
            return gb, ""
    return DEFAULT_GPU_GB, f"unknown GPU type {name!r}: assumed {DEFAULT_GPU_GB} GB"


def parse_gres(gres: str | None) -> tuple[str | None, int]:
    """(GPU type or None, count) from an sbatch --gres value: gpu:H100:2, gpu:2, gpu:a100."""
    for part in (gres or "").split(","):
        fields = part.strip().split(":")
        if fields[0] != "gpu":
            continue
        if len(fields) == 1:
            return None, 1
        if len(fields) == 2:
            return (None, int(fields[1])) if fields[1].isdigit() else (fields[1], 1)
        return fields[1], int(fields[2]) if fields[2].isdigit() else 1
    return None, 0


def gpu_of(gres: str | None, source: str, key: str = "gres") -> tuple[Gpu | None, list[str]]:
    """The GPU an sbatch --gres value asks for (None: no GPU), and notes on what was assumed."""
    kind, count = parse_gres(gres)
    if not count:
        return None, []
    if kind is None:
        return Gpu("GPU", DEFAULT_GPU_GB, count, f"{source} {key} {gres}"), [
            f"{source}: {key}: no GPU type in {gres!r}; assumed {DEFAULT_GPU_GB} GB"]
    gb, note = gpu_type(kind)
    return Gpu(kind, gb, count, f"{source} {key} {gres}"), [note] if note else []


# -- training ------------------------------------------------------------------------------------


def compute_bytes(precision: str) -> int:
    """Bytes per element of the compute dtype (bf16 and fp16: 2, fp32: 4)."""
    return 4 if precision == "fp32" else 2


def layer_activation_bytes(s: ModelShape, *, length: int, precision: str, mode: str = "full",
                           lora_targets: tuple[str, ...] = (), r: int = 0) -> int:
    """Bytes autograd keeps per token for one decoder layer of a Qwen2/Llama-style model
    (RMSNorm, q/k/v/o projections, sdpa, SwiGLU MLP) in a padded batch of `length` tokens.

    Source: the tensors autograd saves, enumerated for transformers' Qwen2DecoderLayer and
    counted with `torch.autograd.graph.saved_tensors_hooks` (tests/test_plan.py holds this
    formula to those counts for fp32 and bf16 autocast, full fine-tune and LoRA). With c the
    compute dtype's bytes, h the hidden size, a the attention width, i the MLP width:

    - each RMSNorm: its float32 input and normalised input (8h; 4h when its weight is frozen),
      plus the reciprocal root (4);
    - a Linear saves its input when its weight trains: under autocast as a c-byte copy per
      consumer (3 for q/k/v, 2 for gate/up), in fp32 once; o_proj's input is the attention
      output, kept anyway. A LoRA adapter saves its input the same way (peft casts it to the
      adapter's float32 and autocast back: o_proj's too) and its rank-r intermediate (c·r);
    - sdpa with a padding mask (distill's batches are padded or packed): the rotated query,
      the key and value repeated to every head, and the output (4·c·a), the mask converted to
      the compute dtype (c·length) and the log-sum-exp (4 per head); no [length, length] scores;
    - the MLP: gate, activation, up and their product (4·c·i; 3·c·i when down_proj is frozen).

    Full fine-tune, bf16 autocast: 34h + 8i + 2·length + 4·heads + 8 bytes; fp32: 40h + 16i +
    4·length + 4·heads + 8; LoRA on q/k/v/o, bf16: 24h + 8r + 6i + ... . QLoRA is taken from
    bitsandbytes' source, not measured (it needs CUDA): its 4-bit Linear saves no input (only
    the packed weight) and returns its input's dtype, float32 after peft's upcast norms, so it
    is LoRA's count with the MLP's intermediates in float32. Other architectures (Qwen3's q/k
    norms, MoE layers) are approximated by the same terms.
    """
    c, h, a, i = compute_bytes(precision), s.hidden, s.attention, s.intermediate
    full = mode == "full"
    adapted = set(lora_targets)

    def saved_input(width: int, consumers: list[str]) -> int:
        training = consumers if full else [m for m in consumers if m in adapted]
        if not training:
            return 0
        return width * (c * len(training) if c < 4 else 4)

    norms = 2 * ((8 if full else 4) * h + 4)
    inputs = saved_input(h, ["q_proj", "k_proj", "v_proj"]) + saved_input(h, ["gate_proj", "up_proj"])
    if not full and "o_proj" in adapted and c < 4:
        inputs += c * a
    if not full and "down_proj" in adapted:
        inputs += c * i
    adapters = 0 if full else c * r * len(adapted & {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"})
    attention = 4 * c * a + c * length + 4 * s.heads
    mlp = (4 if full else 3) * (4 if mode == "qlora" else c) * i
    return norms + inputs + adapters + attention + mlp


@dataclass(frozen=True)
class Setup:
    """How the training stage runs, resolved: what the memory depends on beyond the shapes."""

    precision: str  # bf16 | fp16 | fp32 (auto resolved for the GPU)
    mode: str  # full | lora | qlora
    batch: int
    length: int
    checkpointing: bool
    grad_accum: int = 1
    loss_chunk: int = 256
    lora_targets: tuple[str, ...] = ()
    lora_r: int = 0
    objective: str = "sft"
    teacher: str = "none"  # none | online | offline
    chunk: str = "ce"  # the loss chunk's working set: ce | kd | kd_offline (CHUNK_BUFFERS)
    hidden_states: bool = False  # the loss keeps every hidden state of the teacher
    world_size: int = 1
    strategy: str = "none"  # none | ddp | fsdp

    @classmethod
    def from_config(cls, t: TrainConfig, precision: str, *, world_size: int = 1, strategy: str = "none",
                    checkpointing: bool | None = None) -> Setup:
        mode = "qlora" if t.quantize == "4bit" else "lora" if t.lora.enabled else "full"
        objective = objectives.build(t)
        return cls(precision=precision, mode=mode, batch=t.batch_size, length=t.max_length,
                   checkpointing=t.gradient_checkpointing if checkpointing is None else checkpointing,
                   grad_accum=t.grad_accum, loss_chunk=t.loss_chunk,
                   lora_targets=tuple(t.lora.target_modules) if mode != "full" else (), lora_r=t.lora.r,
                   objective=t.objective, teacher=objective.teacher(), chunk=objective.chunk_kind(),
                   hidden_states=objective.hidden_states, world_size=world_size, strategy=strategy)


def resolve_precision(precision: str, gpu_name: str) -> str:
    """`train.precision: auto` on a GPU: bf16, fp16 on V100s (no bf16); explicit values stay."""
    if precision != "auto":
        return precision
    return "fp16" if gpu_name.lower().startswith("v100") else "bf16"


def inference_layer_bytes(s: ModelShape, c: int, tokens: int, length: int) -> float:
    """Working set of one decoder layer run without autograd (a frozen teacher, generation's
    prefill): the residual, the norm's float32 temporaries (8h), the MLP's three live
    intermediates and the mask converted by sdpa."""
    return tokens * (2 * c * s.hidden + 8 * s.hidden + 3 * c * s.intermediate + c * length)


def train_memory(s: ModelShape, setup: Setup, teacher: ModelShape | None = None) -> dict[str, Any]:
    """Bytes per GPU of the training stage: its parts, and the peak (`peak`, at `phase`)."""
    c, full = compute_bytes(setup.precision), setup.mode == "full"
    tokens, h, v = setup.batch * setup.length, s.hidden, s.vocab
    head_params = s.head or s.embedding
    adapters = 0 if full else s.lora_params(list(setup.lora_targets), setup.lora_r)
    trained = s.params if full else adapters
    if setup.mode == "qlora":
        weights = NF4_BYTES * s.linear + 4 * (s.params - s.linear) + 4 * adapters
        copies = c * s.linear / s.layers + c * adapters  # one layer dequantised at a time
    elif setup.mode == "lora":
        weights = c * s.params + 4 * adapters
        copies = c * adapters if c < 4 else 0
    else:
        weights = 4 * s.params
        copies = c * s.linear if c < 4 else 0  # autocast's bf16 copies, kept until backward
    grads, optimizer = 4 * trained, 8 * trained
    # The residual stream and the last hidden state are float32 when the embeddings are (a full
    # fine-tune, QLoRA's upcast, fp32), else in the compute dtype (a LoRA base).
    residual = 4 if setup.mode != "lora" or c == 4 else c
    per_layer = layer_activation_bytes(s, length=setup.length, precision=setup.precision, mode=setup.mode,
                                       lora_targets=setup.lora_targets, r=setup.lora_r)
    layer = tokens * per_layer
    act = tokens * s.layers * residual * h if setup.checkpointing else layer * s.layers
    # After the last layer: the final norm's saved tensors, its output, the rows at the
    # target positions and their gradient (every position taken as a target), the bool mask.
    post = tokens * ((8 if full else 4) * h + 3 * h * residual) + setup.batch * setup.length**2
    head_grad = 4 * head_params if full else 0
    # The head's weight in the compute dtype while the loss runs: a copy unless a LoRA base's.
    head_copy = c * head_params if c < 4 and setup.mode != "lora" else 0
    chunk = CHUNK_BUFFERS[setup.chunk] * setup.loss_chunk * v * 4
    t_weights = t_work = capture = 0.0
    if teacher is not None and setup.teacher != "none":
        t_weights = c * teacher.params
        t_work = inference_layer_bytes(teacher, c, tokens, setup.length) + tokens * c * teacher.hidden
        if setup.hidden_states:  # every hidden state of the teacher is kept for the loss
            t_work += (teacher.layers + 1) * tokens * c * teacher.hidden
        if setup.teacher == "offline":  # captured once, before the first step; gone during training
            capture = weights + t_weights + t_work + CHUNK_BUFFERS["ce"] * setup.loss_chunk * v * 4
            t_weights = t_work = 0.0
    n = setup.world_size if setup.strategy == "fsdp" else 1
    gathered = 0.0
    if setup.strategy == "fsdp":  # FULL_SHARD by decoder layer: the root unit and two layers unsharded
        gathered = c * (s.embedding + s.head + 2 * (s.params - s.embedding - s.head) / s.layers)
        weights, grads, optimizer, copies = weights / n, grads / n, optimizer / n, 0.0
    bucket = grads if setup.strategy == "ddp" and setup.world_size > 1 else 0.0
    tied_extra = 4 * s.embedding if full and s.tied else 0  # the embedding's gradient, before it is added
    forward_end = (weights + optimizer + gathered + copies + act + post + head_grad + head_copy + chunk
                   + t_weights + t_work + (grads + bucket if setup.grad_accum > 1 else 0))
    backward_end = (weights + optimizer + gathered + grads + bucket + t_weights
                    + max(layer if setup.checkpointing else 0, tied_extra))
    phases = {"forward": forward_end, "backward": backward_end, "teacher capture": capture}
    # The train job reads the score stage's store; only `train` called alone captures before step 1.
    phase = max(("forward", "backward"), key=phases.__getitem__)
    parts = {"weights": weights, "weight copies": copies, "gradients": grads, "optimizer": optimizer,
             "activations": act, "recomputed layer": layer if setup.checkpointing else 0.0,
             "head and loss": post + head_grad + head_copy + chunk, "teacher": t_weights, "teacher forward": t_work,
             "fsdp gathered": gathered, "ddp buckets": bucket}
    return {"parts": parts, "phases": phases, "peak": phases[phase], "phase": phase,
            "trained_params": trained, "adapter_params": adapters}


# -- generation and evaluation -------------------------------------------------------------------


def prompt_tokens(cfg: RunConfig, template: str, extra_tokens: int = 0) -> int:
    """The longest prompt a model is given, in tokens: the template around the longest question
    allowed (`data.max_question_chars`), at `CHARS_PER_TOKEN`, plus 32 for a chat template."""
    return math.ceil((len(template) + cfg.data.max_question_chars) / CHARS_PER_TOKEN) + 32 + extra_tokens


def generation_memory(s: ModelShape, gpu: Gpu, *, precision: str, backend: str, batch: int, n: int, prompt: int,
                      new_tokens: int, tensor_parallel: int = 1, utilization: float = 0.9) -> dict[str, Any]:
    """Bytes per GPU of generating with model `s`: its weights in the compute dtype, and with
    transformers the KV cache of the whole batch at its longest plus the prefill's working set;
    vLLM instead takes `utilization` of the GPU whatever the model, and the question is whether
    the weights leave room for the KV cache of one sequence at least."""
    c = compute_bytes(precision)
    weights = c * s.params
    kv_token = 2 * s.layers * s.kv_heads * s.head_dim * c
    sequences, length = batch * n, prompt + new_tokens
    notes = []
    if backend == "vllm":
        weights /= tensor_parallel
        reserved = utilization * gpu.bytes
        room = reserved - weights - CUDA_CONTEXT  # vLLM's own activations and CUDA graphs: about 1 GiB
        tokens = max(0, int(room // (kv_token / tensor_parallel)))
        notes.append(f"vLLM takes {utilization:g} of the GPU; KV cache room ≈ {tokens:,} tokens "
                     f"({tokens // length:,} sequences of {length:,})")
        return {"parts": {"weights": weights, "kv cache": max(room, 0.0)}, "peak": reserved,
                "fits_extra": tokens >= length, "notes": notes}
    # distill.generation: a model above 80% of the GPU is spread over the job's GPUs (device_map=auto)
    if weights > 0.8 * (gpu.bytes - CUDA_CONTEXT):
        if gpu.count > 1:
            notes.append(f"weights over 80% of one GPU: spread over the job's {gpu.count} GPUs")
            weights /= gpu.count
        else:
            notes.append("weights over 80% of the GPU: accelerate would move layers to CPU memory (slow)")
    kv = sequences * length * kv_token
    work = inference_layer_bytes(s, c, sequences * prompt, prompt) + 2 * sequences * s.vocab * 4
    return {"parts": {"weights": weights, "kv cache": kv, "prefill": work}, "peak": weights + kv + work,
            "fits_extra": True, "notes": notes}


# -- the whole run -------------------------------------------------------------------------------


def describe_training(setup: Setup) -> str:
    mode = {"full": "full fine-tune",
            "lora": f"LoRA r={setup.lora_r} on {','.join(setup.lora_targets)}",
            "qlora": f"QLoRA (4-bit NF4) r={setup.lora_r} on {','.join(setup.lora_targets)}"}[setup.mode]
    precision = {"fp32": "fp32"}.get(setup.precision, f"{setup.precision} autocast")
    if setup.mode == "full" and setup.precision != "fp32":
        precision += " over fp32 weights"
    teacher = {"none": "", "online": ", teacher online", "offline": ", teacher offline (top-k captured first)"}
    return (f"{setup.objective}, {mode}, {precision}, batch {setup.batch} × {setup.length} tokens, "
            f"grad_accum {setup.grad_accum}, loss_chunk {setup.loss_chunk}{teacher[setup.teacher]}")


def verdict(need: float, gpu: Gpu) -> dict[str, Any]:
    """`need` (a peak) plus the CUDA context against the GPU's nominal memory."""
    total = need + CUDA_CONTEXT
    return {"need": total, "gpu_bytes": gpu.bytes, "fits": total <= gpu.bytes, "spare": gpu.bytes - total}


def memory_plan(cfg: RunConfig, gpus: dict[str, Gpu], *, world_size: int = 1, strategy: str = "none",
         student: ModelShape | None = None, teacher: ModelShape | None = None) -> dict[str, Any]:
    """The memory plan of run config `cfg` on the GPUs its stages get (`gpus` by resource
    section: train, generate, evaluate): the training stage with gradient checkpointing off and
    on, and a line for generation, the student's evaluation and the teacher's."""
    if strategy == "none" and world_size > 1:
        raise DistillError(f"--world-size {world_size} needs --strategy ddp or fsdp (none is one GPU)")
    where = cfg.source or "config"
    student = student or read_shape(cfg.models.student, f"{where}: models.student")
    teacher = teacher or read_shape(cfg.models.teacher, f"{where}: models.teacher")
    precision = resolve_precision(cfg.train.precision, gpus["train"].name)
    setup = Setup.from_config(cfg.train, precision, world_size=world_size, strategy=strategy)
    return {
        "config": cfg.source, "run": cfg.name,
        "student": {"ref": student.ref, "params": student.params, "model_type": student.model_type},
        "teacher": {"ref": teacher.ref, "params": teacher.params, "model_type": teacher.model_type},
        "gpus": {k: {"name": v.name, "gb": v.gb, "count": v.count, "source": v.source} for k, v in gpus.items()},
        "world_size": world_size, "strategy": strategy, "max_question_chars": cfg.data.max_question_chars,
        "train": {"setup": describe_training(setup), "precision": precision,
                  "checkpointing": "on" if setup.checkpointing else "off",
                  **training_lines(cfg, student, teacher, gpus["train"], precision, world_size, strategy)},
        "stages": generation_lines(cfg, student, teacher, gpus),
    }


def training_lines(cfg: RunConfig, student: ModelShape, teacher: ModelShape, gpu: Gpu, precision: str,
                   world_size: int, strategy: str) -> dict[str, Any]:
    """The training stage's estimate with gradient checkpointing off and on, and notes on the
    teacher's share of the GPU."""
    needs_teacher = objectives.build(cfg.train).teacher() != "none"
    lines: dict[str, Any] = {}
    for checkpointing in (False, True):
        setup = Setup.from_config(cfg.train, precision, world_size=world_size, strategy=strategy,
                                  checkpointing=checkpointing)
        est = train_memory(student, setup, teacher if needs_teacher else None)
        lines["on" if checkpointing else "off"] = est | verdict(est["peak"], gpu)
    notes = []
    share = compute_bytes(precision) * teacher.params
    if needs_teacher and setup.teacher == "online" and share > 0.5 * gpu.bytes:  # distill.modeling.TEACHER_SHARE
        where = f"over the job's {gpu.count} GPUs" if gpu.count > 1 else "partly into CPU memory (slow)"
        notes.append(f"the teacher ({share / GB:.1f} GB) is over half the GPU: distill spreads it {where} "
                     "(device_map=auto); counted here whole on the training GPU")
    return {**lines, "notes": notes}


def generation_lines(cfg: RunConfig, student: ModelShape, teacher: ModelShape,
                     gpus: dict[str, Gpu]) -> dict[str, Any]:
    """Weights and KV cache of the teacher's generation and of the student's and the teacher's
    evaluation, each against the GPU of its resource section."""
    g, e, u = cfg.generation, cfg.eval, cfg.undo
    undo_extra = g.max_new_tokens + e.max_new_tokens if u.max_iters > 0 else 0
    gen_n = max(g.n, u.n if u.max_iters > 0 else 1)
    plain = prompt_tokens(cfg, cfg.prompt.template)
    eval_precision = resolve_precision("auto", gpus["evaluate"].name)
    lines = {
        "generate": ("teacher", gpus["generate"], generation_memory(
            teacher, gpus["generate"], precision=resolve_precision("auto", gpus["generate"].name),
            backend=g.backend, batch=g.batch_size, n=gen_n,
            prompt=prompt_tokens(cfg, u.template if undo_extra else cfg.prompt.template, undo_extra),
            new_tokens=g.max_new_tokens, tensor_parallel=g.tensor_parallel_size,
            utilization=g.gpu_memory_utilization)),
        "evaluate, mine": ("student", gpus["evaluate"], generation_memory(
            student, gpus["evaluate"], precision=eval_precision, backend=e.backend or g.backend,
            batch=e.batch_size, n=1, prompt=plain, new_tokens=e.max_new_tokens,
            tensor_parallel=e.tensor_parallel_size, utilization=e.gpu_memory_utilization)),
        "evaluate (iteration 0)": ("teacher", gpus["evaluate"], generation_memory(
            teacher, gpus["evaluate"], precision=eval_precision, backend=g.backend, batch=e.batch_size, n=1,
            prompt=plain, new_tokens=e.max_new_tokens, tensor_parallel=g.tensor_parallel_size,
            utilization=g.gpu_memory_utilization)),
    }
    out = {}
    for name, (role, gpu, est) in lines.items():
        est |= verdict(est["peak"], gpu)
        est["fits"] = est["fits"] and est.pop("fits_extra")
        out[name] = {"model": role, "gpu": f"{gpu.name}, {gpu.gb:g} GB", **est}
    return out


def misfits(p: dict[str, Any], sections: list[str], *, checkpointing: bool,
            teacher_eval: bool) -> list[tuple[str, str]]:
    """(resource section, one line of numbers) for each job of `sections` that plan `p` says
    does not fit its GPU: training at the config's own checkpointing setting, generation, and
    evaluation (the teacher's too where iteration 0 is evaluated)."""
    out = []
    if "train" in sections:
        est, other = (p["train"]["on"], p["train"]["off"]) if checkpointing else (p["train"]["off"], p["train"]["on"])
        if not est["fits"]:
            line = f"training {_needs(est, p['gpus']['train'])}"
            if not checkpointing and other["fits"]:
                line += f"; with train.gradient_checkpointing: true it needs {_gb(other['need'])} GB"
            out.append(("train", line))
    lines = {"generate": ["generate"], "evaluate": ["evaluate, mine", *(["evaluate (iteration 0)"] if teacher_eval
                                                                       else [])]}
    for section in sections:
        for name in lines.get(section, []):
            est = p["stages"][name]
            if not est["fits"]:
                out.append((section, f"{name} ({est['model']}) {_needs(est, p['gpus'][section])}"
                                     + "".join(f"; {n}" for n in est["notes"])))
    return out


def _needs(est: dict[str, Any], gpu: dict[str, Any]) -> str:
    """'needs 82.10 GB a GPU (...the largest parts...) on H100, 80 GB: 3.2 over'"""
    parts = sorted(((v, k) for k, v in est["parts"].items() if v), reverse=True)[:3]
    spare = est["spare"] / GB
    return (f"needs {_gb(est['need'])} GB a GPU ({', '.join(f'{k} {_gb(v)}' for v, k in parts)}, CUDA context "
            f"{_gb(CUDA_CONTEXT)}) on {_gpu(gpu)}: " + (f"{-spare:.1f} GB over" if spare < 0 else "no room left"))


# -- printing ------------------------------------------------------------------------------------

TRAIN_ROWS = {
    "weights": "weights",
    "weight copies": "weight copies (autocast, kept for backward)",
    "gradients": "gradients (fp32, trained parameters)",
    "optimizer": "AdamW moments (fp32, trained parameters)",
    "activations": "activations",
    "recomputed layer": "one layer recomputed in backward",
    "head and loss": "LM head and loss chunk",
    "teacher": "teacher weights",
    "teacher forward": "teacher forward (no grad)",
    "fsdp gathered": "FSDP: unsharded root and 2 layers",
    "ddp buckets": "DDP: gradient buckets",
}


def format_memory_plan(p: dict[str, Any]) -> str:
    """The plan as a readable table (GB = 10^9 bytes)."""
    t, gpus = p["train"], p["gpus"]
    world = "one GPU" if p["strategy"] == "none" else f"{p['strategy'].upper()} over {p['world_size']} GPUs"
    out = [f"plan of {p['config']} (run {p['run']}): memory per GPU, GB = 10^9 bytes"]
    for role in ("student", "teacher"):
        m = p[role]
        out.append(f"{role} {m['ref']}: {m['model_type']}, {m['params'] / 1e9:.2f}B parameters")
    out += [f"GPU: {_gpu(gpus['train'])} ({gpus['train']['source']}); training on {world}", "",
            f"train: {t['setup']}"]
    off, on = t["off"], t["on"]
    width, col = max(len(v) for v in TRAIN_ROWS.values()) + 2, 27
    out.append(f"{'':<{width}}{'checkpointing off':>{col}}{'checkpointing on':>{col}}")
    for key, label in TRAIN_ROWS.items():
        a, b = off["parts"][key], on["parts"][key]
        if a or b:
            out.append(f"{label:<{width}}{_gb(a) if a else '-':>{col}}{_gb(b) if b else '-':>{col}}")
    out.append(f"{'peak, at the end of':<{width}}{_gb(off['peak']) + ' ' + off['phase']:>{col}}"
               f"{_gb(on['peak']) + ' ' + on['phase']:>{col}}")
    out.append(f"{'+ CUDA context (1 GiB)':<{width}}{_gb(off['need']):>{col}}{_gb(on['need']):>{col}}")
    out.append(f"{'on ' + _gpu(gpus['train']):<{width}}{_fit(off):>{col}}{_fit(on):>{col}}")
    out.append(f"(this config: train.gradient_checkpointing {'true' if t['checkpointing'] == 'on' else 'false'})")
    capture = on["phases"]["teacher capture"]
    if capture:
        out.append("offline top-k: the score stage runs the teacher on generate's GPUs; a train run without its "
                   f"store (distill compare) captures it before step 1, student and teacher loaded: {_gb(capture)} GB")
    out += [f"note: {n}" for n in t["notes"]]
    out += ["", f"{'stage':<24}{'model':<9}{'weights':>9}{'KV cache':>10}{'other':>8}{'peak':>8}  verdict"]
    for name, s in p["stages"].items():
        parts = s["parts"]
        other = sum(v for k, v in parts.items() if k not in ("weights", "kv cache"))
        out.append(f"{name:<24}{s['model']:<9}{_gb(parts['weights']):>9}{_gb(parts['kv cache']):>10}"
                   f"{_gb(other) if other else '-':>8}{_gb(s['peak']):>8}  {_fit(s)} on {s['gpu']}")
        out += [f"{'':<33}{n}" for n in s["notes"]]
    out.append(f"prompts: the longest data.max_question_chars allows ({p['max_question_chars']} characters at "
               f"{CHARS_PER_TOKEN} a token) in the template;\ngenerate: UNDO's prompts "
               "(with the previous rationale and the student's answer) and max(generation.n, undo.n) samples")
    return "\n".join(out)


def _gb(x: float) -> str:
    return f"{x / GB:.2f}"


def _gpu(g: dict[str, Any]) -> str:
    return f"{g['name']}, {g['gb']:g} GB"


def _fit(est: dict[str, Any]) -> str:
    spare = est["spare"] / GB
    return f"fits ({spare:.1f} spare)" if est["fits"] else (
        f"does not fit ({-spare:.1f} over)" if spare < 0 else "does not fit")
