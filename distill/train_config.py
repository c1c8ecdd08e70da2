"""The `train` section of a run config: how the student trains, and with which objective.

Kept apart from `distill.config` (which loads and checks whole configs) so that the objectives
(`distill.objectives`), which read these settings, sit below the loader that asks them to
check a config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class LoraConfig:
    """LoRA adapters (peft): train low-rank updates of some linear layers instead of every
    weight; the saved model has them merged into the base."""

    # Train adapters instead of every weight.
    enabled: bool = False
    # The adapters' rank.
    r: int = 8
    # Their scale is alpha / r.
    alpha: int = 16
    # Dropout on the adapters' input.
    dropout: float = 0.0
    # The linear layers that get adapters, by module name.
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class OnPolicyConfig:
    """Objective `onpolicy` (GKD, Agarwal et al. 2024): the student writes the completions it is
    trained on, and the loss is the generalised JSD between the teacher's and the student's
    distributions at every token of them. The teacher is in memory, as `kd`'s online teacher."""

    # The share of micro-batches whose completions the student samples (the rest train on the
    # verified rationales); drawn per (train.seed, step, micro-batch), so a resumed run draws alike.
    lmbda: float = 1.0
    # The generalised JSD's mixture weight: 0 is forward KL, 1 reverse KL (TRL's convention).
    beta: float = 1.0
    # The student's sampling temperature.
    temperature: float = 1.0
    # The longest sampled completion, in tokens (the prompt and it are cut at train.max_length).
    max_new_tokens: int = 128
    # The cross-entropy's weight in the micro-batches of verified rationales (lmbda < 1):
    # (1 - ce_weight) * JSD + ce_weight * CE there. Sampled micro-batches carry the JSD alone.
    ce_weight: float = 0.0
    # Who samples: transformers' generate on the training device, or a vLLM engine in the train
    # job whose weights are pushed from the student before each step (docs/objectives.md).
    sampler: Literal["transformers", "vllm"] = "transformers"
    # sampler vllm: the engine's KV cache in GiB (it shares the job's GPU, or host RAM, with training).
    kv_cache_gib: float = 1.0
    # The teacher reads each completion after its own prompt, train.kd.context_template (the
    # student's prompt in its slot): on-policy context distillation.
    context: bool = False


@dataclass
class KDConfig:
    """The teacher signal of objectives `kd`, `ekd` and `context`: loss = (1 - alpha) * CE +
    alpha * T^2 * divergence(teacher || student) averaged over the selected completion positions.

    `teacher: online` keeps the teacher in memory (full vocabulary, any objective); `offline`
    runs the teacher once over the training set before the first step, stores its `top_k`
    logprobs per token beside the checkpoints and trains without it (kd and ekd only).
    """

    # The divergence: forward KL(teacher || student), reverse KL, or generalised JSD (TRL's GKD).
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    # jsd's mixture weight: 0 is forward KL, 1 reverse KL.
    beta: float = 0.5
    # Both sides' logits are divided by it; the term is multiplied by its square.
    temperature: float = 1.0
    # The divergence's weight; the cross-entropy gets 1 - alpha.
    alpha: float = 0.5
    # online: the teacher in memory; offline: its top_k logprobs stored once (kd and ekd).
    teacher: Literal["online", "offline"] = "online"
    # Logprobs per token the offline teacher stores.
    top_k: int = 20
    # ekd: the share of each sequence's completion positions with the highest score.
    top_k_percent: float | None = 0.2
    # ekd: instead, the positions between two score percentiles, e.g. [70, 80].
    bucket: list[float] | None = None
    # ekd: whose entropy scores a position.
    score: Literal["teacher_entropy", "student_entropy"] = "teacher_entropy"
    # context: the teacher's prompt, with the student's prompt in the {prompt} slot.
    context_template: str = "Solve step by step and end with the answer in \\boxed{{}}.\n{prompt}"


@dataclass
class FeatureConfig:
    """Objective `feature`: hidden-state matching through a learned linear projection
    (student width -> teacher width), one pair [student layer, teacher layer] per entry
    (hidden_states indices: 0 = embeddings, -1 = last layer), plus CE weighted 1 - alpha."""

    # [student layer, teacher layer] pairs, as hidden_states indices.
    layers: list[list[int]] = field(default_factory=lambda: [[-1, -1]])
    # The distance between projected student and teacher states.
    loss: Literal["mse", "cosine"] = "mse"
    # Its weight; the cross-entropy gets 1 - alpha.
    alpha: float = 0.5


@dataclass
class TrainConfig:
    """Student training; one optimizer step consumes `batch_size * grad_accum` examples."""

    # A module of distill/objectives (sft, kd, ekd, context, feature, onpolicy; docs/objectives) or the
    # dotted path of a module elsewhere that defines OBJECTIVE.
    objective: str = "sft"
    # AdamW's peak learning rate.
    lr: float = 2e-5
    # Passes over the training set (max_steps, when set, wins).
    epochs: float = 1.0
    # Optimizer steps; null: as many as `epochs` take.
    max_steps: int | None = None
    # Examples per micro-batch.
    batch_size: int = 8
    # Micro-batches per optimizer step.
    grad_accum: int = 1
    # Tokens per example, prompt and completion; longer completions are cut, longer prompts dropped.
    max_length: int = 2048
    # The share of the steps the learning rate warms up over.
    warmup_ratio: float = 0.0
    # AdamW's weight decay.
    weight_decay: float = 0.0
    # The learning rate after warm-up.
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    # A checkpoint every this many steps (and at a stop signal): where a requeued job resumes.
    save_steps: int = 100
    # Checkpoints kept on disk, newest first.
    keep_checkpoints: int = 2
    # Log the loss every this many steps.
    log_steps: int = 10
    # Where the logged steps also go: [tensorboard] writes event files beside the training
    # (iter-N/train/tensorboard; `make tensorboard RUN=...`); [] writes none.
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    # Seeds the data order, the initial weights of anything new, and dropout.
    seed: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    feature: FeatureConfig = field(default_factory=FeatureConfig)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    # QLoRA: load the student in 4-bit NF4 (bitsandbytes) and train LoRA adapters on it.
    quantize: Literal["none", "4bit"] = "none"
    # Pack each micro-batch's examples into rows of up to max_length tokens (attention kept
    # within each example) instead of padding every example to the longest; sft only.
    packing: bool = False
    # auto: bf16 on GPUs that have it, fp16 with loss scaling on older GPUs, fp32 on the CPU.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # Recompute each layer's activations in backward instead of keeping them (less memory,
    # about a third more compute).
    gradient_checkpointing: bool = False
    # Positions per chunk of the LM head and the loss: bounds the vocabulary-sized tensors.
    loss_chunk: int = 256
    # Under torchrun, one process per GPU: ddp replicates the student, fsdp shards it (FSDP2, one
    # unit per decoder layer). Either way a step consumes the same batch as one process would
    # (distill.ranks); without torchrun the job runs as one process. The cluster profile's
    # nodes, tasks_per_node and gpus_per_node lay the ranks out (jobs.launch).
    distributed: Literal["none", "ddp", "fsdp"] = "none"
