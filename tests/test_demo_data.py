"""The demo world: deterministic, leak-free splits of correct two-step arithmetic problems."""

from __future__ import annotations

import random
import re

import pytest

from distill import demo_data as world
from distill.jsonl import read_jsonl

SIZES = {"train": 400, "validation": 60, "test": 60}
SOLUTION_RE = re.compile(r"(\d)\*(\d)=(\d+)\. (\d+)([+-])(\d+)=(\d+)\. \\boxed\{(\d+)\}")


def _template_regex(template: str) -> re.Pattern[str]:
    """A template as a regex that captures a, b and c (names and objects as alternatives)."""
    slots = {
        "{a}": r"(?P<a>\d+)",
        "{b}": r"(?P<b>\d+)",
        "{c}": r"(?P<c>\d+)",
        "{name}": "(?:" + "|".join(n for n, _ in world.NAMES) + ")",
        "{pron}": "(?:He|She)",
        "{obj}": "(?:" + "|".join(world.OBJECTS) + ")",
        "{box}": "(?:" + "|".join(world.CONTAINERS) + ")",
    }
    pattern, seen = "", set()
    for part in re.split(r"(\{\w+\})", template):
        if part in ("{a}", "{b}", "{c}") and part in seen:
            pattern += rf"(?P={part[1:-1]})"
        elif part in slots:
            pattern += slots[part]
            seen.add(part)
        else:
            pattern += re.escape(part)
    return re.compile(pattern)


PLUS = [_template_regex(t) for t in world.PLUS_TEMPLATES]
MINUS = [_template_regex(t) for t in world.MINUS_TEMPLATES]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict[str, str]]]:
    return world.make_splits(SIZES, seed=0)


def test_example_shape_from_brief() -> None:
    q = world.PLUS_TEMPLATES[0].format(name="Tom", pron="He", a=23, b=4, c=7, obj="marbles", box="bags")
    assert q == "Tom has 23 marbles. He buys 4 bags with 7 marbles each. How many marbles does Tom have now?"


def test_enough_templates_and_short_questions() -> None:
    assert len(world.PLUS_TEMPLATES) + len(world.MINUS_TEMPLATES) >= 6
    rng = random.Random(3)
    for _ in range(2000):
        assert len(world.make_problem(rng)["question"].split()) < 25


def test_make_problem_is_deterministic_for_an_rng() -> None:
    a = [world.make_problem(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert set(a[0]) == {"question", "solution", "answer"}


def test_splits_deterministic_by_seed_and_differ_across_seeds(splits) -> None:
    assert world.make_splits(SIZES, seed=0) == splits
    other = world.make_splits(SIZES, seed=1)
    for name in SIZES:
        assert [r["question"] for r in other[name]] != [r["question"] for r in splits[name]]


def test_sizes_and_ids(splits) -> None:
    assert list(splits) == list(SIZES)
    for name, n in SIZES.items():
        assert [r["id"] for r in splits[name]] == [f"{name}-{i:05d}" for i in range(n)]


def test_questions_unique_across_splits(splits) -> None:
    questions = [r["question"] for recs in splits.values() for r in recs]
    assert len(questions) == len(set(questions)) == sum(SIZES.values())
    train = {r["question"] for r in splits["train"]}
    assert not train & {r["question"] for r in splits["test"]}
    assert not train & {r["question"] for r in splits["validation"]}


def test_held_out_splits_do_not_depend_on_train_size(splits) -> None:
    bigger = world.make_splits({**SIZES, "train": 800}, seed=0)
    assert bigger["test"] == splits["test"]
    assert bigger["validation"] == splits["validation"]


def test_every_solution_is_right_and_matches_its_question(splits) -> None:
    ops = set()
    for rec in (r for recs in splits.values() for r in recs):
        m = SOLUTION_RE.fullmatch(rec["solution"])
        assert m, rec["solution"]
        b, c, prod, a, op, prod2, result, boxed = m.groups()
        assert int(b) * int(c) == int(prod) == int(prod2)
        assert int(result) == (int(a) + int(prod) if op == "+" else int(a) - int(prod))
        assert boxed == result == rec["answer"]
        assert int(result) >= 0
        assert 10 <= int(a) <= 40 and 2 <= int(b) <= 9 and 2 <= int(c) <= 9
        matches = [p.fullmatch(rec["question"]) for p in (PLUS if op == "+" else MINUS)]
        q = next((x for x in matches if x), None)
        assert q, f"question does not match a {op} template: {rec['question']}"
        assert (q["a"], q["b"], q["c"]) == (a, b, c)
        ops.add(op)
    assert ops == {"+", "-"}


def test_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match="size"):
        world.make_splits({"train": -1}, seed=0)


def test_write_splits_and_cli(tmp_path, splits) -> None:
    paths = world.write_splits(tmp_path / "a", SIZES, seed=0)
    assert {k: p.name for k, p in paths.items()} == {k: f"{k}.jsonl" for k in SIZES}
    for name, path in paths.items():
        records = read_jsonl(path)
        assert records == splits[name]
        assert list(records[0]) == ["id", "question", "answer", "solution"]

    world.main(["--out", str(tmp_path / "b"), "--train", "400", "--validation", "60", "--test", "60"])
    for name in SIZES:
        assert (tmp_path / "b" / f"{name}.jsonl").read_bytes() == paths[name].read_bytes()
