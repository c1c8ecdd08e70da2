"""Every numeric and template key is range-checked when the config loads, float spellings YAML
1.1 reads as strings (`1e-3`) are floats, and a bad `--set` is named as the `--set`."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from distill.config import RANGES, RunConfig, load_config
from distill.errors import ConfigError
from distill.typed_yaml import _convert
from tests.test_config import BASE, write


def nested(dotted: str, value: str) -> str:
    """`train.lora.r`, `0` -> the YAML block `train:\\n  lora:\\n    r: 0\\n`."""
    keys = dotted.split(".")
    return ("".join("  " * i + f"{k}:\n" for i, k in enumerate(keys[:-1]))
            + "  " * (len(keys) - 1) + f"{keys[-1]}: {value}\n")


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path, overrides)
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


# key path, YAML value, the allowed range as the message states it, the value as it is printed
OUT_OF_RANGE = [
    ("train.lr", ".inf", "> 0 and finite", "inf"),
    ("train.lr", ".nan", "> 0 and finite", "nan"),
    ("train.lr", "-1", "> 0 and finite", "-1.0"),
    ("train.log_steps", "0", ">= 1", "0"),
    ("train.log_steps", "-5", ">= 1", "-5"),
    ("train.warmup_ratio", "1.5", "in [0, 1]", "1.5"),
    ("train.warmup_ratio", "-0.1", "in [0, 1]", "-0.1"),
    ("train.weight_decay", "-0.01", ">= 0 and finite", "-0.01"),
    ("train.weight_decay", ".inf", ">= 0 and finite", "inf"),
    ("train.weight_decay", ".nan", ">= 0 and finite", "nan"),
    ("train.epochs", "0", "> 0 and finite", "0.0"),
    ("train.epochs", "-1", "> 0 and finite", "-1.0"),
    ("train.epochs", ".inf", "> 0 and finite", "inf"),
    ("data.train_limit", "0", ">= 1", "0"),
    ("eval.limit", "0", ">= 1", "0"),
    ("undo.probe_limit", "-1", ">= 1", "-1"),
    ("train.lora.r", "0", ">= 1", "0"),
    ("train.lora.alpha", "0", ">= 1", "0"),
    ("train.lora.alpha", "-16", ">= 1", "-16"),
    ("train.lora.dropout", "2", "in [0, 1)", "2.0"),
    ("train.lora.dropout", "1", "in [0, 1)", "1.0"),
    ("train.lora.dropout", "-0.1", "in [0, 1)", "-0.1"),
    ("train.kd.temperature", ".inf", "> 0 and finite", "inf"),
    ("train.kd.temperature", ".nan", "> 0 and finite", "nan"),
    ("generation.temperature", ".inf", ">= 0 and finite", "inf"),
    ("generation.temperature", ".nan", ">= 0 and finite", "nan"),
    ("undo.temperature", ".nan", ">= 0 and finite", "nan"),
    ("undo.temperature", "-1", ">= 0 and finite", "-1.0"),
    ("train.max_length", "1", ">= 2", "1"),
    ("train.max_steps", "0", ">= 1", "0"),
    ("generation.top_p", ".nan", "in (0, 1]", "nan"),
    ("train.kd.top_k_percent", ".nan", "in (0, 1]", "nan"),
    ("train.kd.top_k_percent", "5", "in (0, 1]", "5.0"),
    ("generation.kv_cache_gib", ".nan", "in (0, 1000000) GiB", "nan"),
    ("eval.kv_cache_gib", ".inf", "in (0, 1000000) GiB", "inf"),
    ("train.kd.alpha", ".nan", "in [0, 1]", "nan"),
    ("train.seed", "-1", "in [0, 4294967295]", "-1"),
    ("generation.seed", "-1", "in [0, 4294967295]", "-1"),
]


@pytest.mark.parametrize("key, value, allowed, shown", OUT_OF_RANGE, ids=[f"{k}={v}" for k, v, _, _ in OUT_OF_RANGE])
def test_out_of_range_value_in_the_file_names_file_key_and_range(tmp_path, key, value, allowed, shown):
    p = write(tmp_path, BASE + nested(key, value))
    assert error_of(p) == f"{p}: {key}: must be {allowed}, got {shown}"


@pytest.mark.parametrize("key, value, allowed, shown", OUT_OF_RANGE, ids=[f"{k}={v}" for k, v, _, _ in OUT_OF_RANGE])
def test_out_of_range_value_given_with_set_names_the_set(tmp_path, key, value, allowed, shown):
    p = write(tmp_path, BASE)
    assert error_of(p, [f"{key}={value}"]) == f"--set {key}={value}: {key}: must be {allowed}, got {shown}"


def test_every_numeric_key_has_a_range():
    def numeric_keys(cls: type, prefix: str = "") -> list[str]:
        keys = []
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) else [tp]
            if dataclasses.is_dataclass(inner[0]):
                keys += numeric_keys(inner[0], f"{prefix}{f.name}.")
            elif inner[0] in (int, float):
                keys.append(prefix + f.name)
        return keys

    assert sorted(numeric_keys(RunConfig)) == sorted(key for key, _ in RANGES)


@pytest.mark.parametrize("sets", [
    ["train.warmup_ratio=0", "train.weight_decay=0", "train.max_length=2", "train.max_steps=1",
     "train.lora={dropout: 0, r: 1, alpha: 1}"],
    ["train.warmup_ratio=1", "train.epochs=0.5", "train.kd.temperature=0.1", "train.kd.top_k_percent=1"],
    ["generation.temperature=0", "generation.n=1", "generation.top_p=1", "generation.kv_cache_gib=0.5",
     "generation.seed=4294967295"],
    ["undo.temperature=0", "undo.n=1", "undo.probe_limit=1", "data.train_limit=1", "eval.limit=1"],
])
def test_values_at_the_edges_of_their_ranges_are_accepted(tmp_path, sets):
    load_config(write(tmp_path, BASE), sets)


@pytest.mark.parametrize("key, template, message", [
    ("undo.template", "'Previous answer: {previous}'", "must contain the {question} slot"),
    ("prompt.template", "'Q: {q}'", "must contain the {question} slot"),
    ("train.kd.context_template", "'Think.'", "must contain the {prompt} slot"),
    ("train.kd.context_template", "'{prompt} in \\\\boxed{}'",
     "must be a str.format template whose only slot is {prompt} (write {{ and }} for literal braces)"),
    ("train.kd.context_template", "'{prompt} {hint}'",
     "must be a str.format template whose only slot is {prompt} (write {{ and }} for literal braces)"),
])
def test_template_without_its_slot_is_refused(tmp_path, key, template, message):
    p = write(tmp_path, BASE + nested(key, template))
    assert error_of(p) == f"{p}: {key}: {message}"


# -- float spellings that YAML 1.1 reads as strings ------------------------------------------------


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("5E-5", 5e-5), ("+1e4", 1e4), ("1.0e3", 1e3), ("2e0", 2.0)])
def test_exponent_spellings_are_floats_in_a_file_and_in_set(tmp_path, text, value):
    assert load_config(write(tmp_path, BASE + f"train: {{lr: {text}}}\n")).train.lr == value
    cfg = load_config(write(tmp_path, BASE), [f"train.lr={text}"])
    assert cfg.train.lr == value and isinstance(cfg.train.lr, float)


def test_a_converted_spelling_is_range_checked_and_hashes_like_the_plain_number(tmp_path):
    p = write(tmp_path, BASE)
    assert error_of(p, ["train.lr=-2e-1"]) == "--set train.lr=-2e-1: train.lr: must be > 0 and finite, got -0.2"
    assert load_config(p, ["train.lr=1e-3"]).hash() == load_config(p, ["train.lr=0.001"]).hash()
    assert _convert("-2e-1", float, "x") == -0.2


def test_spellings_in_lists_and_optional_floats(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.objective=ekd", "train.kd.top_k_percent=null",
                                              "train.kd.bucket=[7e1, 8e1]", "generation.kv_cache_gib=2e0"])
    assert cfg.train.kd.bucket == [70.0, 80.0] and cfg.generation.kv_cache_gib == 2.0


@pytest.mark.parametrize("key, text, expected", [
    ("train.lr", "fast", "expected float, got 'fast'"),
    ("train.lr", "1e", "expected float, got '1e'"),
    ("train.lr", "e5", "expected float, got 'e5'"),
    ("train.batch_size", "1e3", "expected int, got '1e3'"),
])
def test_strings_that_are_no_float_spelling_are_still_refused(tmp_path, key, text, expected):
    p = write(tmp_path, BASE + nested(key, text))
    assert error_of(p) == f"{p}: {key}: {expected}"


# -- errors of overridden keys name the --set ------------------------------------------------------


def test_a_type_error_from_set_names_the_set(tmp_path):
    p = write(tmp_path, BASE)
    assert error_of(p, ["train.lr=fast"]) == "--set train.lr=fast: train.lr: expected float, got 'fast'"
    assert error_of(p, ["train.lora={r: x}"]) == "--set train.lora={r: x}: train.lora.r: expected int, got 'x'"


def test_a_key_not_overridden_still_names_the_file(tmp_path):
    p = write(tmp_path, BASE + "train: {lr: -1}\n")
    assert error_of(p, ["train.batch_size=4"]) == f"{p}: train.lr: must be > 0 and finite, got -1.0"
    p = write(tmp_path, BASE + "train: {lr: fast}\n")
    assert error_of(p, ["train.batch_size=4"]) == f"{p}: train.lr: expected float, got 'fast'"


def test_a_mapping_given_with_set_is_named_for_the_keys_below_it(tmp_path):
    p = write(tmp_path, BASE)
    assert error_of(p, ["train.lora={r: 0}"]) == "--set train.lora={r: 0}: train.lora.r: must be >= 1, got 0"


def test_the_last_set_of_a_key_is_named(tmp_path):
    p = write(tmp_path, BASE)
    assert (error_of(p, ["train.lr=-1", "train.lr=-2"])
            == "--set train.lr=-2: train.lr: must be > 0 and finite, got -2.0")


def test_a_set_that_breaks_a_constraint_between_keys_is_named(tmp_path):
    p = write(tmp_path, BASE + "generation: {n: 4, temperature: 0.7}\n")
    assert error_of(p, ["generation.temperature=0"]).startswith(
        "--set generation.temperature=0: generation.n: 4 samples at temperature 0 would be 4 copies")
