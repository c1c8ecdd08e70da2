"""Where every artifact lives, in one place (like submitit's `JobPaths`): a run directory, a
training output directory, an evaluation directory. No other module spells a file name of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from distill.integrity import is_sealed

CKPT_RE = re.compile(r"^step-(\d{8})$")


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.jsonl"


@dataclass(frozen=True)
class TrainPaths:
    """One training run's output: checkpoints, the final model, the teacher's stored top-k."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:
        return self.root / "model"

    def topk(self, k: int) -> Path:
        return self.root / f"teacher-top{k}.safetensors"

    @property
    def topk_info(self) -> Path:
        return self.root / "teacher-topk.json"

    @property
    def timing(self) -> Path:
        """Wall time of a run trained start to finish in one call (`distill compare`)."""
        return self.root / "timing.json"


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Sealed checkpoints (`distill.integrity.seal`), oldest first; temporary directories of an
    interrupted save are ignored."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if CKPT_RE.match(p.name) and is_sealed(p))


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (not yet checked against its hashes)."""
    complete = complete_checkpoints(ckpt_dir)
    return complete[-1] if complete else None


@dataclass(frozen=True)
class EvalPaths:
    """Greedy answers of models on a problem set, one folder per model label, sharded."""

    root: Path
    num_shards: int

    def shard(self, label: str, shard: int) -> Path:
        return self.root / label / shard_name(shard, self.num_shards)

    def graded_shard(self, label: str, shard: int) -> Path:
        return self.shard(label, shard).with_suffix(".graded.jsonl")

    def stats(self, label: str, shard: int) -> Path:
        return self.shard(label, shard).with_suffix(".stats.json")

    def graded(self, label: str) -> Path:
        return self.root / label / "graded.jsonl"

    def metrics(self, label: str) -> Path:
        return self.root / label / "metrics.json"

    def merged_labels(self) -> list[str]:
        """The labels whose answers are merged (`graded.jsonl`), by name."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if self.graded(p.name).is_file())

    @property
    def meta(self) -> Path:
        """What a standalone evaluation directory evaluates (`distill eval`)."""
        return self.root / "eval.json"


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

    @property
    def submit_lock(self) -> Path:
        return self.root / "submit.lock"

    @property
    def report(self) -> Path:
        """report.md, with report.json and report.png beside it."""
        return self.root / "report.md"

    def iteration(self, it: int) -> Path:
        return self.root / f"iter-{it}"

    def progress(self, it: int, stage: str, key: str) -> Path:
        """A running unit's last progress figure (`distill.progress`), e.g. `progress/train-0.json`."""
        return self.iteration(it) / "progress" / f"{stage}-{key}.json"

    def heartbeat(self, it: int, stage: str, key: str) -> Path:
        """A running unit's heartbeat (`distill.lease.UnitBeat`): the time it last said it was alive."""
        return self.iteration(it) / "progress" / f"{stage}-{key}.beat"

    def gen_shard(self, it: int, shard: int, num_shards: int) -> Path:
        return self.iteration(it) / "generate" / shard_name(shard, num_shards)

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

    def mine_responses(self, it: int) -> Path:
        return self.mine_dir(it) / "responses.jsonl"

    def mine_graded(self, it: int) -> Path:
        return self.mine_dir(it) / "graded.jsonl"

    def errors(self, it: int) -> Path:
        return self.iteration(it) / "errors.jsonl"

    def score_shard(self, it: int, shard: int, num_shards: int) -> Path:
        """A score shard's folder of parts (`distill.scoring`)."""
        return self.iteration(it) / "score" / shard_name(shard, num_shards).removesuffix(".jsonl")

    def scores(self, it: int, k: int) -> Path:
        """The teacher's top-k over iteration it's training tokens, merged from the score shards."""
        return self.iteration(it) / "score" / f"teacher-top{k}.safetensors"

    def train_data(self, it: int) -> Path:
        """The training set D_it after the dataset policy (accumulate/replace, cap)."""
        return self.iteration(it) / "train_data.jsonl"

    def train(self, it: int) -> TrainPaths:
        return TrainPaths(self.iteration(it) / "train")

    def baseline(self, it: int) -> TrainPaths:
        """The one-shot student trained at the compute of iterations 0..it."""
        return TrainPaths(self.iteration(it) / "oneshot")

    def student(self, it: int) -> Path:
        return self.train(it).model

    def eval(self, it: int, num_shards: int) -> EvalPaths:
        return EvalPaths(self.iteration(it) / "eval", num_shards)

    def compare(self, steps: int) -> Path:
        """`distill compare` at `steps` optimizer steps: one TrainPaths per objective, eval/."""
        return self.root / "compare" / f"steps-{steps}"
