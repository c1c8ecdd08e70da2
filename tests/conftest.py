"""Shared fixtures: a tiny world (data, tokenizer, teacher, student) built locally per session.

Nothing is downloaded: the models are random Qwen2 configs saved with `save_pretrained` and
loaded back through `from_pretrained`, the same path a real checkpoint takes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TinyWorld:
    data: Path
    teacher: Path
    student: Path

    def write_config(self, path: Path, run_root: Path, name: str = "t", extra: str = "") -> Path:
        """A small config pointing at this world; `extra` is YAML appended verbatim."""
        text = textwrap.dedent(f"""\
            name: {name}
            run_root: {run_root}
            models:
              teacher: {self.teacher}
              student: {self.student}
            data:
              train: {self.data / 'train.jsonl'}
              validation: {self.data / 'validation.jsonl'}
              test: {self.data / 'test.jsonl'}
            generation:
              max_new_tokens: 12
              batch_size: 8
              num_shards: 2
            train:
              lr: 0.001
              max_steps: 6
              batch_size: 4
              save_steps: 3
              max_length: 128
            eval:
              limit: 8
              max_new_tokens: 12
              batch_size: 8
            """)
        path.write_text(text + textwrap.dedent(extra))
        return path


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    from distill.demo_data import make_splits, write_splits
    from distill.tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("world")
    sizes = {"train": 24, "validation": 8, "test": 8}
    write_splits(root / "data", sizes, seed=0)
    texts = [t for recs in make_splits(sizes, seed=0).values() for r in recs for t in (r["question"], r["solution"])]
    build_tokenizer(texts + ["Question: ", "\nAnswer: "], root / "tokenizer", vocab_size=300)
    # Head size 32: the smallest vLLM's CPU attention runs, so these models load on vLLM too.
    shape = {"num_kv_heads": 1, "max_position_embeddings": 256}
    teacher = build_model(root / "tokenizer", root / "teacher", hidden_size=64, num_heads=2, num_layers=2,
                          intermediate_size=64, seed=1, **shape)
    student = build_model(root / "tokenizer", root / "student", hidden_size=32, num_heads=1, num_layers=1,
                          intermediate_size=32, seed=2, **shape)
    return TinyWorld(data=root / "data", teacher=teacher, student=student)


def run_python(code: str, **kw) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter from the project root (a real process, as a job would be)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, **kw)


def spawn_python(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_stage_unit(cfg, it: int, name: str, key: str = "0") -> dict:
    """One unit of a registered stage through the runner, as any launcher runs it; its
    manifest fields (metrics for a single-unit stage), or the failure raised."""
    from distill import pipeline
    from distill.runner import run_unit

    outcome = run_unit(cfg, it, pipeline.stage(name), key, progress=False)
    if outcome.state != "done":
        raise AssertionError(f"{name} {key}: {outcome.state}: {outcome.error}")
    return outcome.fields.get("metrics", outcome.fields)


def merge_stage_units(cfg, it: int, name: str) -> dict:
    """A sharded stage's merge; the stage entry's metrics."""
    from distill import pipeline
    from distill.runner import merge_stage

    return merge_stage(cfg, it, pipeline.stage(name))["metrics"]
