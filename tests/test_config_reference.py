"""The configuration reference is the schema's: the committed page is what the schema generates,
every key has help written beside its field, and every range names a key that exists."""

from __future__ import annotations

from distill.config import RANGES, RunConfig
from distill.config_reference import reference, rows
from distill.typed_yaml import check_key_path
from tests.conftest import ROOT


def test_the_committed_page_is_what_the_schema_generates():
    page = (ROOT / "docs" / "config-reference.md").read_text()
    assert page == reference(), "docs/config-reference.md differs from the schema: run `make config-reference`"


def test_every_key_has_help_and_every_range_a_key():
    keys = {key: text for key, _, _, _, text in rows(RunConfig)}
    assert not [k for k, text in keys.items() if not text], "a config key without help (comment above its field)"
    for key, _ in RANGES:
        check_key_path(RunConfig, key, "RANGES")
        assert key in keys


def test_one_key_is_shown_with_its_type_default_range_and_help(capsys):
    from distill.__main__ import main

    assert main(["config-reference", "train.kd.alpha"]) in (0, None)
    out = capsys.readouterr().out
    assert out == ("train.kd.alpha: float, default `0.5`, in [0, 1]\n"
                   "  The divergence's weight; the cross-entropy gets 1 - alpha.\n")
