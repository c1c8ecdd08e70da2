"""The embedded demo world: procedurally generated two-step arithmetic word problems.

Every problem is `a + b*c` or `a - b*c` told as a short story, with a compact worked solution
("4*7=28. 23+28=51. \\boxed{51}") that a tiny model can learn and a checker can verify. Splits
are deterministic for a seed and never share a question text, so test scores are not leakage.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from distill.jsonl import write_jsonl

NAMES: tuple[tuple[str, str], ...] = (
    ("Tom", "He"),
    ("Ana", "She"),
    ("Sam", "He"),
    ("Lily", "She"),
    ("Ben", "He"),
    ("Mia", "She"),
    ("Max", "He"),
    ("Zoe", "She"),
)
OBJECTS: tuple[str, ...] = (
    "marbles",
    "stickers",
    "apples",
    "pencils",
    "cookies",
    "stamps",
    "cards",
    "shells",
)
CONTAINERS: tuple[str, ...] = ("bags", "boxes", "packs", "jars")

# {a} is the start amount, {b} the number of groups, {c} the size of each group: the answer is a +/- b*c.
PLUS_TEMPLATES: tuple[str, ...] = (
    "{name} has {a} {obj}. {pron} buys {b} {box} with {c} {obj} each. How many {obj} does {name} have now?",
    "{name} had {a} {obj}. Then {name} found {b} {box}, each with {c} {obj}. How many {obj} does {name} have?",
    "A shelf holds {a} {obj}. {name} adds {b} {box} of {c} {obj} each. How many {obj} are on the shelf now?",
    "{name} starts with {a} {obj} and collects {c} {obj} a day for {b} days. How many {obj} does {name} have?",
)
MINUS_TEMPLATES: tuple[str, ...] = (
    "{name} has {a} {obj}. {pron} gives away {b} {box} with {c} {obj} each. How many {obj} are left?",
    "A store had {a} {obj}. It sold {b} {box} of {c} {obj} each. How many {obj} remain?",
    "{name} had {a} {obj} and used {c} {obj} a day for {b} days. How many {obj} does {name} have left?",
    "A jar held {a} {obj}. {name} took out {c} {obj} {b} times. How many {obj} are in the jar now?",
)

A_RANGE = (10, 40)
BC_RANGE = (2, 9)
TRAIN_SPLIT = "train"
# The start of every split's seed string: changing it changes every demo problem (and data/tiny).
SEED_PREFIX = "distill.world"


def _valid_triples(minus: bool) -> list[tuple[int, int, int]]:
    """All (a, b, c) in range; for minus only those with b*c <= a, so answers are never negative."""
    lo, hi = BC_RANGE
    triples = [
        (a, b, c)
        for a in range(A_RANGE[0], A_RANGE[1] + 1)
        for b in range(lo, hi + 1)
        for c in range(lo, hi + 1)
    ]
    return [t for t in triples if not minus or t[1] * t[2] <= t[0]]


# Uniform over valid triples: rejecting per pair instead would pile minus answers up at 0.
PLUS_TRIPLES = _valid_triples(minus=False)
MINUS_TRIPLES = _valid_triples(minus=True)


def make_problem(rng: random.Random) -> dict[str, str]:
    """One problem: question text, worked solution (product first, then the sum/difference), answer."""
    minus = rng.random() < 0.5
    a, b, c = rng.choice(MINUS_TRIPLES if minus else PLUS_TRIPLES)
    template = rng.choice(MINUS_TEMPLATES if minus else PLUS_TEMPLATES)
    name, pron = rng.choice(NAMES)
    question = template.format(
        name=name, pron=pron, a=a, b=b, c=c, obj=rng.choice(OBJECTS), box=rng.choice(CONTAINERS)
    )
    product = b * c
    result = a - product if minus else a + product
    op = "-" if minus else "+"
    solution = f"{b}*{c}={product}. {a}{op}{product}={result}. \\boxed{{{result}}}"
    return {"question": question, "solution": solution, "answer": str(result)}


def _split_order(splits: list[str]) -> list[str]:
    """Held-out splits first, train last: eval sets then do not change when the train size does."""
    return [s for s in splits if s != TRAIN_SPLIT] + [s for s in splits if s == TRAIN_SPLIT]


def _generate_split(
    split: str, n: int, seed: int, seen: set[str], max_tries_per_record: int = 1000
) -> list[dict[str, str]]:
    """Draw `n` problems whose questions are not in `seen` (updated in place)."""
    # A string seed is hashed with SHA-512 by `random`, so this is stable across runs and platforms.
    rng = random.Random(f"{SEED_PREFIX}:{seed}:{split}")
    records: list[dict[str, str]] = []
    tries = 0
    while len(records) < n:
        tries += 1
        if tries > max_tries_per_record * n:
            raise ValueError(f"split {split!r}: could not draw {n} unique questions")
        problem = make_problem(rng)
        if problem["question"] in seen:
            continue
        seen.add(problem["question"])
        records.append({"id": f"{split}-{len(records):05d}", **problem})
    return records


def make_splits(sizes: dict[str, int], seed: int) -> dict[str, list[dict[str, str]]]:
    """Deterministic splits for `seed`, with no question text shared between any two splits."""
    for split, n in sizes.items():
        if n < 0:
            raise ValueError(f"split {split!r}: size must be >= 0, got {n}")
    seen: set[str] = set()
    made = {split: _generate_split(split, sizes[split], seed, seen) for split in _split_order(list(sizes))}
    return {split: made[split] for split in sizes}


def write_splits(out_dir: str | Path, sizes: dict[str, int], seed: int) -> dict[str, Path]:
    """Write `<split>.jsonl` files (id, question, answer, solution) and return their paths."""
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    for split, records in make_splits(sizes, seed).items():
        path = out_dir / f"{split}.jsonl"
        fields = ("id", "question", "answer", "solution")
        write_jsonl(path, ({k: r[k] for k in fields} for r in records))
        paths[split] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m distill.demo_data",
        description="Generate the demo world: two-step arithmetic word problems (a + b*c, a - b*c) "
        "as train/validation/test JSONL files with fields id, question, answer, solution.",
    )
    parser.add_argument("--out", required=True, help="output directory for <split>.jsonl files")
    parser.add_argument("--train", type=int, default=4000, help="number of train problems (default 4000)")
    parser.add_argument(
        "--validation", type=int, default=300, help="number of validation problems (default 300)"
    )
    parser.add_argument("--test", type=int, default=300, help="number of test problems (default 300)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed; same seed gives the same files (default 0)"
    )
    args = parser.parse_args(argv)
    sizes = {"train": args.train, "validation": args.validation, "test": args.test}
    for split, path in write_splits(args.out, sizes, args.seed).items():
        print(f"{split}: {sizes[split]} problems -> {path}")


if __name__ == "__main__":
    main()
