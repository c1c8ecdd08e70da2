"""The `train` section of a run config: how the student trains, and with which objective.

Kept apart from `distill.config` (which loads and checks whole configs) so that the objectives
(`distill.objectives`), which read these settings, sit below the loader that asks them to
check a config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from distill.typed_yaml import compat


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

    # A module of distill/objectives (sft, kd, ekd, context, feature; docs/objectives) or the
    # dotted path of a module elsewhere that defines OBJECTIVE.
    objective: str = "sft"
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
