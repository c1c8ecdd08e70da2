"""Prompt text for teacher and student, the same way in generation, training and evaluation."""

from __future__ import annotations

from typing import Any

from distill.config import PromptConfig


def fill(template: str, **slots: Any) -> str:
    """Fill `{slot}` placeholders; literal braces elsewhere (LaTeX) are left alone."""
    out = template
    for key, value in slots.items():
        out = out.replace("{" + key + "}", str(value))
    return out


def training_pairs(prompt: PromptConfig, records: list[dict[str, Any]], tokenizer: Any) -> list[tuple[str, str]]:
    """(student prompt, teacher rationale) per record: the student sees the plain prompt, never
    the teacher's error-conditioned one."""
    return [(build_prompt(tokenizer, prompt, r["question"]), r["response"]) for r in records]


def build_prompt(
    tokenizer: Any, prompt: PromptConfig, question: str, template: str | None = None, **slots: Any
) -> str:
    """The model-ready prompt: the tokenizer's chat template when it has one, else plain text."""
    text = fill(template or prompt.template, **slots, question=question)
    if prompt.use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False,
            **prompt.chat_template_kwargs,
        )
    return text
