"""Where every artifact of a run lives, in one place (like submitit's `JobPaths`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def iteration(self, it: int) -> Path:
        return self.root / f"iter-{it}"

    def gen_shard(self, it: int, shard: int, num_shards: int) -> Path:
        return self.iteration(it) / "generate" / f"shard-{shard:05d}-of-{num_shards:05d}.jsonl"

    def generations(self, it: int) -> Path:
        return self.iteration(it) / "generations.jsonl"

    def graded(self, it: int) -> Path:
        return self.iteration(it) / "graded.jsonl"

    def verified(self, it: int) -> Path:
        return self.iteration(it) / "verified.jsonl"

    def unsolved(self, it: int) -> Path:
        """Problems for which no teacher sample was verified correct."""
        return self.iteration(it) / "unsolved.jsonl"

    def mine_dir(self, it: int) -> Path:
        return self.iteration(it) / "mine"

    def errors(self, it: int) -> Path:
        return self.iteration(it) / "errors.jsonl"

    def train_data(self, it: int) -> Path:
        """The training set D_it after the dataset policy (accumulate/replace, cap)."""
        return self.iteration(it) / "train_data.jsonl"

    def baseline_dir(self, it: int) -> Path:
        return self.iteration(it) / "oneshot"

    def train_dir(self, it: int) -> Path:
        return self.iteration(it) / "train"

    def student(self, it: int) -> Path:
        return self.train_dir(it) / "model"

    def eval_dir(self, it: int, label: str) -> Path:
        return self.iteration(it) / "eval" / label

    def eval_shard(self, it: int, label: str, shard: int, num_shards: int) -> Path:
        return self.eval_dir(it, label) / f"shard-{shard:05d}-of-{num_shards:05d}.jsonl"
