"""`onpolicy`: on-policy distillation (GKD, Agarwal et al. 2024; TRL's `DistillationTrainer`).

For a share `lmbda` of the micro-batches the student samples the completions itself, from the
current weights; the others train on the verified rationales. The loss is the generalised JSD
(`beta`: 0 forward KL, 1 reverse KL, the default) between the teacher's distribution and the
student's at every completion token, the teacher scoring the student's own tokens. The
micro-batches of verified rationales may mix in their cross-entropy (`ce_weight`: (1 - w) · JSD
+ w · CE there); the sampled ones never do: the student's own samples are not targets. With
`context` the teacher reads each completion after its own prompt (`train.kd.context_template`),
as `context` distillation's teacher does, but on the student's samples: on-policy context
distillation.

What is sampled depends on (train.seed, step, micro-batch, example) alone: each example is
sampled on its own under its own seed, so a resumed run samples the same tokens, and several
ranks sample what one process would. In an UNDO iteration a share of the sampled prompts may be
the mined errors' (`undo.onpolicy_errors`): the student practises where it failed. Samples come
from transformers' `generate` on the training device, one example at a time, or (`sampler:
vllm`) from a vLLM engine the trainer keeps in step with the student's weights
(`distill.policy_sampling`), a micro-batch's prompts at once.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from distill.objectives import IGNORE, ChunkKind, Objective, Teacher, Trainer

if TYPE_CHECKING:
    import torch


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers, the same on every machine and Python."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def prompt_end(labels: list[int]) -> int:
    """Where an example's prompt ends: its first labelled position."""
    return next(i for i, lab in enumerate(labels) if lab != IGNORE)


class OnPolicy(Objective):
    logit_term = True
    presets = {
        "onpolicy": ["train.objective=onpolicy"],
        "onpolicy-jsd": ["train.objective=onpolicy", "train.onpolicy.beta=0.5"],
        "onpolicy-context": ["train.objective=onpolicy", "train.onpolicy.context=true"],
    }
    gpu_checks = {"onpolicy reverse KL": {"objective": "onpolicy", "onpolicy": {"max_new_tokens": 16}}}

    def check(self, at: Any) -> None:
        from distill.errors import ConfigError

        if self.cfg.distributed == "fsdp":
            raise ConfigError(f"{at('train.distributed', 'train.objective')}: onpolicy samples from the whole student "
                              "on each rank, which fsdp shards; use ddp")
        p = self.cfg.onpolicy
        if p.sampler == "vllm" and (self.cfg.distributed != "none" or self.cfg.quantize == "4bit"):
            what = "train.distributed" if self.cfg.distributed != "none" else "train.quantize"
            raise ConfigError(f"{at('train.onpolicy.sampler', what)}: the vLLM sampler runs one engine in one "
                              "process from full-precision weights; with several ranks or QLoRA use "
                              "sampler: transformers")
        if p.ce_weight and p.lmbda == 1.0:
            raise ConfigError(f"{at('train.onpolicy.ce_weight', 'train.onpolicy.lmbda')}: the cross-entropy joins "
                              "the micro-batches of verified rationales, and with lmbda 1 every one is sampled; "
                              "lower lmbda or drop ce_weight")

    def teacher(self) -> Teacher:
        return "online"

    def alpha(self) -> float:
        return 1.0 - self.cfg.onpolicy.ce_weight

    def batch_alpha(self, batch: dict[str, Any]) -> float:
        return 1.0 if batch.get("sampled") else self.alpha()

    def chunk_kind(self) -> ChunkKind:
        return "kd"

    def describe(self) -> str:
        p = self.cfg.onpolicy
        ce = f", CE {p.ce_weight} on rationales" if p.ce_weight else ""
        context = ", teacher with train.kd.context_template" if p.context else ""
        return (f"lmbda {p.lmbda}, beta {p.beta}, sampled at T {p.temperature}, <= {p.max_new_tokens} tokens"
                f"{ce}{context}")

    def sampled(self, step: int, micro: int) -> bool:
        """Whether micro-batch `micro` of step `step` trains on the student's own samples."""
        import random

        return random.Random(seed_of(self.cfg.seed, step, micro, 0)).random() < self.cfg.onpolicy.lmbda

    def resample(self, trainer: Trainer, examples: list[dict[str, list[int]]], indices: list[int], step: int,
                 micro: int) -> list[dict[str, list[int]]]:
        if not examples or not self.sampled(step, micro):
            return examples
        sources = [self.prompt_source(trainer, ex, (self.cfg.seed, step, micro, i + 1))
                   for ex, i in zip(examples, indices, strict=True)]
        seeds = [seed_of(self.cfg.seed, step, micro, i + 1) for i in indices]
        if self.cfg.onpolicy.sampler == "vllm":
            return self.sample_vllm(trainer, sources, seeds, step)
        model = trainer.student
        was_training = model.training
        model.eval()
        try:
            return [self.sample(trainer, ex, seed) for ex, seed in zip(sources, seeds, strict=True)]
        finally:
            model.train(was_training)

    def prompt_and_room(self, example: dict[str, list[int]]) -> tuple[list[int], int]:
        """The example's prompt tokens, and how many tokens a completion of it may have."""
        prompt = example["input_ids"][: prompt_end(example["labels"])]
        return prompt, min(self.cfg.onpolicy.max_new_tokens, self.cfg.max_length - len(prompt))

    def sample_vllm(self, trainer: Trainer, sources: list[dict[str, list[int]]], seeds: list[int],
                    step: int) -> list[dict[str, list[int]]]:
        """The micro-batch's samples from the vLLM engine, synced to the student's weights first."""
        engine = trainer.policy_engine(self.cfg.onpolicy.kv_cache_gib)
        engine.sync(trainer.student, step)
        asked = [(j, prompt, room) for j, (prompt, room) in enumerate(map(self.prompt_and_room, sources)) if room >= 1]
        out = list(sources)
        got = engine.sample([p for _, p, _ in asked], [seeds[j] for j, _, _ in asked], [r for _, _, r in asked],
                            self.cfg.onpolicy.temperature, trainer.tokenizer.eos_token_id)
        for (j, prompt, _), completion in zip(asked, got, strict=True):
            out[j] = self.completed(trainer, sources[j], prompt, completion)
        return out

    def completed(self, trainer: Trainer, source: dict[str, list[int]], prompt: list[int],
                  completion: list[int]) -> dict[str, list[int]]:
        """A sampled example: the completion cut after its first end-of-sequence token, after the
        teacher's own prompt too where it has one (`context`)."""
        eos = trainer.tokenizer.eos_token_id
        if eos in completion:
            completion = completion[: completion.index(eos) + 1]
        out = {"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion, "sampled": True}
        if "t_input_ids" in source:
            own = source["t_input_ids"][: prompt_end(source["t_labels"])]
            out |= {"t_input_ids": own + completion, "t_labels": [IGNORE] * len(own) + completion}
        return out

    def teacher_prompt(self, prompt: str) -> str | None:
        return self.cfg.kd.context_template.format(prompt=prompt) if self.cfg.onpolicy.context else None

    def prompt_source(self, trainer: Trainer, example: dict[str, list[int]], key: tuple[int, ...]) -> dict:
        """The example whose prompt is sampled in `example`'s place: with the trainer's focus
        (`undo.onpolicy_errors`), a share of the draws goes to the focused examples (the mined
        errors), picked by `key` alone."""
        import random

        pool, share = getattr(trainer, "focus", ([], 0.0))
        draw = random.Random(seed_of(*key, 1))
        if pool and draw.random() < share:
            return trainer.examples[pool[draw.randrange(len(pool))]]
        return example

    def sample(self, trainer: Trainer, example: dict[str, list[int]], seed: int) -> dict[str, list[int]]:
        """`example`'s prompt with a completion the student samples under `seed`."""
        import torch
        from transformers import GenerationConfig

        prompt, room = self.prompt_and_room(example)
        if room < 1:
            return example
        tok = trainer.tokenizer
        device = next(trainer.student.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            settings = GenerationConfig(do_sample=True, temperature=self.cfg.onpolicy.temperature, top_k=0, top_p=1.0,
                                        max_new_tokens=room, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id)  # the model's own defaults left out
            out = trainer.student.generate(torch.tensor([prompt], device=device), generation_config=settings)
        return self.completed(trainer, example, prompt, out[0, len(prompt):].tolist())

    def divergence(self, trainer: Trainer, logits: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        from distill import divergences

        t_logits = rows["t_hidden"] @ trainer.t_weight.T
        return divergences.full_kd(logits, t_logits, "jsd", beta=self.cfg.onpolicy.beta)[0]


OBJECTIVE = OnPolicy
