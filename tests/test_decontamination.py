"""Decontamination: planted copies of held-out problems are found, warned about, left out or
refused; the demo's and the real-model example's splits hold none."""

from __future__ import annotations

import json

import pytest

from distill.config import load_config
from distill.decontamination import overlap
from distill.errors import DataError
from distill.jsonl import read_jsonl
from distill.preflight import check_inputs
from distill.problems import eval_problems, probe_problems, split_overlap, train_problems
from tests.conftest import ROOT


def planted(tiny_world, tmp_path, decontaminate: str = "warn"):
    """The tiny world's training file with three test questions planted in it: one verbatim,
    one in other case and punctuation, one with a sentence added."""
    test = read_jsonl(tiny_world.data / "test.jsonl")
    train = read_jsonl(tiny_world.data / "train.jsonl")
    copies = [{**test[0], "id": "planted-0"},
              {**test[1], "id": "planted-1", "question": test[1]["question"].upper().replace("?", " ?!")},
              {**test[2], "id": "planted-2", "question": test[2]["question"] + " Show your work."}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train[:10] + copies + train[10:]))
    cfg_path = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs")
    return load_config(cfg_path, [f"data.train={path}", f"data.decontaminate={decontaminate}"]), test


def test_planted_copies_are_found_and_nothing_else(tiny_world, tmp_path):
    cfg, test = planted(tiny_world, tmp_path)
    found = split_overlap(cfg, "train")
    assert found.copies == {"planted-0": test[0]["id"], "planted-1": test[1]["id"], "planted-2": test[2]["id"]}
    assert found.checked == len(read_jsonl(tiny_world.data / "train.jsonl")) + 3
    (note,) = [n for n in check_inputs(cfg) if n.startswith("data.train:")]
    assert note.startswith(f"data.train: 3 of {found.checked} problems are near-copies of a data.test problem "
                           f"(>= 80% of their 8-grams in it), e.g. planted-0 ~ test {test[0]['id']}")


def test_drop_leaves_the_copies_out_of_generation_and_refuse_stops_the_run(tiny_world, tmp_path):
    (tmp_path / "drop").mkdir()
    cfg, _ = planted(tiny_world, tmp_path / "drop", "drop")
    ids = [p["id"] for p in train_problems(cfg)]
    assert not [i for i in ids if i.startswith("planted")] and len(ids) == len(read_jsonl(cfg.data.train)) - 3
    assert "; left out;" in split_overlap(cfg, "train").line("train", "test", 0.8, "drop")
    (tmp_path / "refuse").mkdir()
    cfg, _ = planted(tiny_world, tmp_path / "refuse", "refuse")
    with pytest.raises(DataError, match=r"data.decontaminate: data.train: 3 of \d+ problems are near-copies"):
        check_inputs(cfg)


def test_the_probe_split_is_checked_and_dropped_too(tiny_world, tmp_path):
    cfg, test = planted(tiny_world, tmp_path, "drop")
    cfg = load_config(cfg.source, [f"data.validation={cfg.data.train}", "data.decontaminate=drop"])
    assert not [p for p in probe_problems(cfg) if p["id"].startswith("planted")]
    assert eval_problems(cfg)[0]["id"] == test[0]["id"]  # the evaluated split itself is never touched


def test_a_share_just_above_zero_is_open_r1_s_any_8_gram_rule():
    held_out = [{"id": "t", "question": "Lily had 40 shells and used 2 shells a day for 4 days. How many are left?"}]
    mine = [{"id": "a", "question": "Max had 28 shells and used 5 shells a day for 4 days. How many are left?"}]
    assert overlap(mine, held_out, 0.8).copies == {} and overlap(mine, held_out, 0.8).sharing == 1
    assert overlap(mine, held_out, 1e-9).copies == {"a": "t"}


@pytest.mark.parametrize("config", ["configs/tiny.yaml", "configs/examples/smollm2-selfdistill-cpu.yaml"])
def test_the_demo_and_the_real_model_example_hold_no_copies(config):
    cfg = load_config(ROOT / config)
    for split in ("train", cfg.undo.probe_split):
        found = split_overlap(cfg, split)
        assert found.copies == {}, (split, found)
        print(f"{config}: {found.line(split, cfg.eval.split, cfg.data.decontaminate_share, 'warn')}")
