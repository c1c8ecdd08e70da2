"""Benchmark adapters, user files in other formats, and `data.benchmark` in configs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from distill.benchmarks import BENCHMARKS, find_benchmark, load_benchmark, split_names
from distill.config import DataConfig, load_config
from distill.errors import ConfigError, DataError
from distill.preflight import check_paths
from distill.problems import load_problems

BASE = "name: demo\nmodels: {teacher: m/t, student: m/s}\n"


def test_every_split_loads_whole_with_its_fields_and_metadata():
    for ref in split_names():
        problems = load_benchmark(ref)
        assert len(problems) == find_benchmark(ref).size, ref
        assert len({p["id"] for p in problems}) == len(problems), ref
        assert all(p["question"].strip() and p["gold"].strip() for p in problems), ref
    math = load_benchmark("math500", limit=3)
    assert len(math) == 3 and math[0]["id"] == "test/precalculus/807.json"
    assert math[0]["meta"] == {"subject": "Precalculus", "level": 2}
    assert math[0]["gold"] == r"\left( 3, \frac{\pi}{2} \right)"
    svamp = load_benchmark("svamp:test", limit=1)[0]
    assert svamp == {"id": "chal-1", "question": "Each pack of dvds costs 76 dollars. If there is a discount of 25 "
                     "dollars on each pack How much do you have to pay to buy each pack?", "gold": "51",
                     "meta": {"type": "Subtraction"}}
    gsm = load_benchmark("gsm8k", limit=2)  # a bare name is the test split
    assert gsm[1]["id"] == "gsm8k-test-00001" and gsm[0]["gold"].endswith("#### 18") and "meta" not in gsm[0]
    assert load_benchmark("gsm8k:train", limit=1)[0]["question"].startswith("Natalia sold clips")
    assert find_benchmark("data/tiny/test.jsonl") is None and find_benchmark("math500:train") is None


def test_svamp_golds_grade_as_their_equations():
    """SVAMP's float answers become integers where integral and still grade against themselves."""
    from distill.grading import grade

    problems = load_benchmark("svamp", limit=40)
    results = grade([(p["gold"], f"\\boxed{{{p['gold']}}}") for p in problems], workers=1, progress=False)
    assert all(ok for _, ok in results)


def test_config_names_a_benchmark_or_per_split_names(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BASE + "data: {benchmark: gsm8k}\n")
    cfg = load_config(path)
    assert (cfg.data.train, cfg.data.validation, cfg.data.test) == ("gsm8k:train", None, "gsm8k:test")
    assert load_problems(cfg.data, "test", limit=2)[0]["id"] == "gsm8k-test-00000"
    path.write_text(BASE + "data: {train: gsm8k:train, test: math500}\n")
    cfg = load_config(path, ["models.teacher=./m/t"])
    assert load_problems(cfg.data, "test", limit=1)[0]["meta"]["subject"] == "Precalculus"
    with pytest.raises(ConfigError, match="models.teacher: path not found"):  # data splits are not paths
        check_paths(cfg)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ("{benchmark: math500}", "data.train: required key missing (benchmark math500 has no train split)"),
        ("{benchmark: gsm9k, train: a.jsonl}",
         "data.benchmark: unknown benchmark 'gsm9k' (known: gsm8k, math500, svamp)"),
        ("{train: math500:train}", "data.train: unknown benchmark split 'math500:train' (known: gsm8k:train,"),
        ("{test: svamp}", "data.train: required key missing"),
        ("{train: a.jsonl, format: csv}",
         "data.format: expected one of auto, jsonl, json, parquet, datasets, got 'csv'"),
    ],
)
def test_benchmark_config_errors_name_file_and_key(tmp_path, data, error):
    path = tmp_path / "c.yaml"
    path.write_text(BASE + f"data: {data}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}: {error}")


def test_new_keys_at_their_defaults_leave_the_config_hash_alone(tmp_path):
    """Runs started before these keys existed keep matching their own config."""
    path = tmp_path / "c.yaml"
    path.write_text(BASE + "data: {train: d/train.jsonl, test: d/test.jsonl}\n")
    cfg = load_config(path)
    assert cfg.hash() == "d3b6a9e0c238f59f"  # as computed before verify/benchmark/vllm keys were added
    assert load_config(path, ["verify.filter=none", "generation.logprobs=0"]).hash() == cfg.hash()
    assert load_config(path, ["verify.filter=median_tokens"]).hash() != cfg.hash()
    assert load_config(path, ["generation.tensor_parallel_size=2"]).hash() != cfg.hash()


def _data(path: Path, **kw) -> DataConfig:
    return DataConfig(train=str(path), **kw)


def test_user_json_array_with_a_field_mapping_and_metadata(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"q": "1+1?", "a": 2.0, "kind": "add"}, {"q": "2*3?", "a": "6", "kind": "mul"}]))
    problems = load_problems(_data(path, question_field="q", answer_field="a", meta_fields=["kind"]), "train")
    assert problems == [
        {"id": "train-00000", "question": "1+1?", "gold": "2", "meta": {"kind": "add"}},
        {"id": "train-00001", "question": "2*3?", "gold": "6", "meta": {"kind": "mul"}},
    ]
    with pytest.raises(DataError, match=r"p.json\[0\]: missing field 'level'"):
        load_problems(_data(path, question_field="q", answer_field="a", meta_fields=["level"]), "train")
    path.write_text('{"q": 1}')
    with pytest.raises(DataError, match="expected a JSON array of objects"):
        load_problems(_data(path, question_field="q", answer_field="a"), "train")


def test_duplicate_ids_name_both_places(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 1, "question": "a", "answer": "1"}\n{"id": 1, "question": "b", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: duplicate id '1' \(first at .*p.jsonl:1\)"):
        load_problems(_data(path), "train")


def test_parquet_without_pyarrow_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"p.parquet: reading this format needs the 'pyarrow.parquet' package"):
        load_problems(_data(path), "train")


def test_parquet_with_a_column_mapping(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["1+1?", "2+2?"], "solution": ["\\boxed{2}", "\\boxed{4}"]}), path)
    problems = load_problems(_data(path, question_field="prompt", answer_field="solution"), "train", limit=1)
    assert problems == [{"id": "train-00000", "question": "1+1?", "gold": "\\boxed{2}"}]


def test_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    from datasets.table import InMemoryTable

    path = tmp_path / "ds"
    # Built from an Arrow table with a given fingerprint: `from_dict` hashes through dill, which
    # trips over pyarrow types in some version mixes and is not what this test is about.
    ds = datasets.Dataset(InMemoryTable(pa.table({"question": ["1+1?"], "answer": ["2"]})), fingerprint="t")
    datasets.DatasetDict({"train": ds}).save_to_disk(path)
    assert load_problems(_data(path), "train")[0]["gold"] == "2"
    with pytest.raises(DataError, match="no split 'test'"):
        load_problems(DataConfig(test=str(path)), "test")


def test_benchmarks_table_matches_the_data_readme():
    readme = (Path(__file__).resolve().parents[1] / "data" / "benchmarks" / "README.md").read_text()
    for splits in BENCHMARKS.values():
        for split in splits.values():
            assert f"| {split.file} | {split.size} |" in readme
