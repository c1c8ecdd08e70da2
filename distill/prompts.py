"""Prompt text for teacher and student, the same way in generation, training and evaluation."""

from __future__ import annotations

import re
from typing import Any

from distill.config import PromptConfig


def fill(template: str, **slots: Any) -> str:
    """Fill `{slot}` placeholders in one pass: text a value brings in is never filled again (a
    student answer that reads `{question}` stays literal), and braces that are no slot (LaTeX's
    `\\boxed{}`) are left alone."""
    if not slots:
        return template
    pattern = re.compile("{(" + "|".join(re.escape(k) for k in slots) + ")}")
    return pattern.sub(lambda m: str(slots[m.group(1)]), template)


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
