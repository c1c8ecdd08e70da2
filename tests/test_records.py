"""What stages record, read back: artifacts are declared by the stage that writes them and named
through it by the stages that read them, and a run directory written by distill (the demo run
in tests/data/demo-run: its manifest, config and report as `make demo` wrote them on
2026-12-07) stays readable by today's code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from distill import pipeline
from distill.config import load_config
from distill.integrity import Input, recorded
from distill.manifest import Manifest, format_table
from distill.records import ModelResult, StageRecord
from distill.report import build_rows
from distill.stage import Result, Stage
from distill.undo import next_iteration, verdict

RUN = Path(__file__).parent / "data" / "demo-run"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    copy = tmp_path / "demo-run"
    shutil.copytree(RUN, copy)
    return copy


def _inputs(cfg, iterations: int) -> list[tuple[int, Stage, Input]]:
    """(iteration, stage, input) for every stage an iteration runs, the baseline's from iteration 1."""
    plans = [pipeline.iteration_plan(it) + (pipeline.baseline_plan() if it else []) for it in range(iterations)]
    return [(it, s, item) for it, plan in enumerate(plans) for s in plan for item in s.inputs(cfg, it)]


def test_every_input_is_an_artifact_its_producer_declares():
    cfg = load_config(RUN / "config.yaml")
    for it, consumer, item in _inputs(cfg, 3):
        producer = pipeline.stage(item.stage)
        assert item.name in producer.produces, (consumer.name, item)
        assert item.iteration <= it, (consumer.name, item)
        if item.iteration == it:  # within an iteration, the producer runs first
            assert pipeline.names().index(producer.name) < pipeline.names().index(consumer.name), (consumer.name, item)


def test_a_stage_refuses_to_name_or_record_an_artifact_it_does_not_declare():
    train = pipeline.stage("train")
    assert train.output("model", 2) == Input(2, "train", "model")
    with pytest.raises(ValueError, match=r"stage train produces no artifact 'modle' "
                                         r"\(it produces: model, train_data\)"):
        train.output("modle", 0)
    fields = Result({"artifacts": {"model": {}, "weights": {}}}).fields
    with pytest.raises(ValueError, match="stage train recorded undeclared artifact\\(s\\) weights"):
        train.checked(fields)
    assert train.checked({"metrics": {"step": 3}}) == {"metrics": {"step": 3}}


def test_a_written_run_keeps_its_config_hash_and_every_recorded_artifact_is_declared():
    data = json.loads((RUN / "manifest.json").read_text())
    assert load_config(RUN / "config.yaml").hash() == data["config_hash"]
    for it, entry in data["iterations"].items():
        for name in entry["stages"]:
            record = StageRecord.of(data, it, name)
            assert record.done, (it, name)
            assert set(record.artifacts) <= set(pipeline.stage(name).produces), (it, name)
            assert all(len(a.sha256) == 64 and not a.path.startswith("/") for a in record.artifacts.values())
    cfg = load_config(RUN / "config.yaml")
    for _, consumer, item in _inputs(cfg, len(data["iterations"])):
        assert recorded(data, item) is not None, (consumer.name, item)  # every reference resolves on disk's record


def test_the_undo_verdict_the_report_and_status_read_a_written_run(run: Path):
    manifest = Manifest(run)
    data = manifest.read()
    student = [ModelResult.of(data["iterations"][it]["stages"]["evaluate"]["results"]["student"]) for it in ("0", "1")]
    assert [v.accuracy for v in student] == [0.0333, 0.18]
    second = verdict(manifest, 1)
    assert (second.accuracy, second.before, second.improved) == (0.18, 0.0333, True)
    assert second.line() == "iter 1: student accuracy 0.180 improved on iteration 0 (0.033)"
    cfg = load_config(run / "config.yaml")
    assert next_iteration(cfg, manifest, 1) == (None, "")  # undo.max_iters: 1 reached
    assert build_rows(data) == json.loads((run / "report.json").read_text())["rows"]
    table = format_table(data, pipeline.names(), run)
    for name in ("mine", "generate", "verify", "train", "evaluate", "baseline_train", "baseline_evaluate"):
        assert f" {name} " in table, name
    assert StageRecord.of(data, 5, "train") == StageRecord("pending", {}, {}, {})
    assert StageRecord.of(data, 1, "evaluate").result("teacher") is None  # baselines are evaluated in iteration 0
