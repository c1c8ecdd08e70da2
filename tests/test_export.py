"""`distill export`: the dataset loads with `datasets` and equals verified.jsonl, the model loads
with `from_pretrained` and generates what the run's model does, and the cards hold the run's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill import pipeline
from distill.__main__ import main as cli
from distill.jsonl import read_jsonl
from distill.layout import RunPaths
from distill.manifest import Manifest
from distill.records import StageRecord
from tests.conftest import merge_stage_units, run_stage_unit
from tests.test_integrity import config, finished_verify


@pytest.fixture(scope="module")
def finished_run(tiny_world, tmp_path_factory):
    """Iteration 0 of a small run: gold solutions as its verified set, trained and evaluated."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = config(tiny_world, tmp)
    finished_verify(cfg)
    run_stage_unit(cfg, 0, "train")
    for key in pipeline.stage("evaluate").units(cfg, 0):
        run_stage_unit(cfg, 0, "evaluate", key)
    merge_stage_units(cfg, 0, "evaluate")
    return cfg


@pytest.mark.slow
def test_the_exported_dataset_loads_with_datasets_and_equals_verified_jsonl(finished_run, tmp_path, monkeypatch):
    from datasets import load_dataset

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert cli(["export", "--run", str(finished_run.run_dir), "--iter", "0", "--what", "data",
                "--out", str(tmp_path / "ds")]) == 0
    records = read_jsonl(RunPaths(finished_run.run_dir).verified(0))
    rows = load_dataset("parquet", data_files=str(tmp_path / "ds" / "data" / "*.parquet"), split="train",
                        cache_dir=str(tmp_path / "cache"))
    assert [dict(r) for r in rows] == records
    by_card = load_dataset(str(tmp_path / "ds"), split="train", cache_dir=str(tmp_path / "cache"))  # the card's configs
    assert by_card.num_rows == len(records)
    card = (tmp_path / "ds" / "README.md").read_text()
    assert card.startswith("---\nlicense: ") and f"| rationales | {len(records)} |" in card
    assert f"| problems covered | {len({r['problem_id'] for r in records})} |" in card
    assert f"`{finished_run.models.teacher}`" in card


@pytest.mark.slow
def test_the_exported_model_generates_what_the_run_s_model_does_and_its_card_holds_the_accuracies(
        finished_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert cli(["export", "--run", str(finished_run.run_dir), "--iter", "0", "--what", "model",
                "--out", str(tmp_path / "model")]) == 0
    run_model = RunPaths(finished_run.run_dir).train(0).model
    prompt = read_jsonl(Path(finished_run.data.test))[0]["question"]
    outputs = []
    for folder in (run_model, tmp_path / "model"):
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        ids = tok(f"Question: {prompt}\nAnswer: ", return_tensors="pt").input_ids
        with torch.no_grad():
            outputs.append(model.generate(ids, max_new_tokens=16, do_sample=False).tolist())
    assert outputs[0] == outputs[1]
    card = (tmp_path / "model" / "README.md").read_text()
    manifest = Manifest(finished_run.run_dir).read()
    for label, row in (("student", "this model"), ("base", "the untrained student"), ("teacher", "the teacher")):
        res = StageRecord.of(manifest, 0, "evaluate").result(label)
        assert f"| {row} | {100 * res.accuracy:.1f}% | {100 * res.flexible_accuracy:.1f}% | {res.details['n']} |" \
            in card, (label, card)
    steps = StageRecord.of(manifest, 0, "train").metrics["step"]
    assert f"objective `sft`; {steps} optimizer steps" in card


@pytest.mark.slow
def test_a_damaged_artifact_is_refused_not_exported(finished_run, tmp_path, capsys):
    verified = RunPaths(finished_run.run_dir).verified(0)
    text = verified.read_text()
    try:
        verified.write_text(text.replace('"correct": true', '"correct": false', 1))
        assert cli(["export", "--run", str(finished_run.run_dir), "--iter", "0", "--what", "data",
                    "--out", str(tmp_path / "ds")]) == 2
        assert "changed since" in capsys.readouterr().err
        assert not (tmp_path / "ds" / "data").exists()
    finally:
        verified.write_text(text)
