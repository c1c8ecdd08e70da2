"""`sft`: cross-entropy on the teacher's verified rationales, and nothing else (no teacher)."""

from __future__ import annotations

from distill.objectives import Objective


class SFT(Objective):
    presets = {"sft": ["train.objective=sft"]}
    packs = True

    def describe(self) -> str:
        return "cross-entropy on teacher rationales"


OBJECTIVE = SFT
