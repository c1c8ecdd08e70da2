"""Training problems that are near-copies of held-out ones, by word 8-gram overlap.

open-r1 decontaminates by 8-grams of normalised text (lower case, words of letters and digits);
a problem counts here as a copy of a held-out problem when at least `data.decontaminate_share`
of its 8-grams are found in that one problem (a problem shorter than 8 words: all its words, in
order). The count of problems sharing any 8-gram at all, open-r1's own rule, is reported beside
it: in templated sets it is most of them, with no problem repeated.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

N = 8
WORD = re.compile(r"[a-z0-9]+")


def ngrams(text: str, n: int = N) -> set[tuple[str, ...]]:
    words = WORD.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()


@dataclass(frozen=True)
class Overlap:
    """What one split shares with the held-out split."""

    checked: int
    copies: dict[str, str]  # problem id -> id of the held-out problem it copies
    sharing: int  # problems with any 8-gram in the held-out split

    def line(self, split: str, held_out: str, share: float, action: str) -> str:
        first = next(iter(self.copies.items()), None)
        example = f", e.g. {first[0]} ~ {held_out} {first[1]}" if first else ""
        done = {"drop": "; left out", "refuse": "", "warn": ""}[action] if self.copies else ""
        return (f"data.{split}: {len(self.copies)} of {self.checked} problems are near-copies of a data.{held_out} "
                f"problem (>= {share:.0%} of their 8-grams in it){example}{done}; {self.sharing} share some 8-gram "
                "with it (open-r1's rule)")


def overlap(problems: list[dict[str, Any]], held_out: list[dict[str, Any]], share: float) -> Overlap:
    """Each problem of `problems` against the held-out problems."""
    where: dict[tuple[str, ...], set[int]] = defaultdict(set)
    for j, problem in enumerate(held_out):
        for gram in ngrams(problem["question"]):
            where[gram].add(j)
    copies, sharing = {}, 0
    for problem in problems:
        grams = ngrams(problem["question"])
        found: dict[int, int] = defaultdict(int)
        for gram in grams:
            for j in where.get(gram, ()):
                found[j] += 1
        if not found:
            continue
        sharing += 1
        best = max(found, key=lambda j: found[j])
        if found[best] >= share * len(grams):
            copies[str(problem["id"])] = str(held_out[best]["id"])
    return Overlap(len(problems), copies, sharing)
