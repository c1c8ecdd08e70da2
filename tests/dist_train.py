"""One training run for the tests, as a job would start it: `python -m tests.dist_train SPEC` for
one process, `torchrun ... -m tests.dist_train SPEC` for several. Not a test module.

SPEC is JSON: `student`, `teacher`, `out`, `n_pairs` (the first n of tests.test_training's
pairs), `train` (TrainConfig fields; `kd`, `lora` and `onpolicy` as mappings; onpolicy samples 12 tokens
unless it says otherwise), and optionally `stop_rank`
with `stop_after` (that rank alone asks to stop after so many steps of this call), `step_sleep`
(seconds each step waits, to give a test time to act). USR2 asks the receiving rank to stop, as
SLURM's signal does. Each rank writes `pid-<rank>` into `out` when it starts and `result-<rank>.json`
when `train` returns: the result, and the newest checkpoint's history.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from distill.train_config import KDConfig, LoraConfig, OnPolicyConfig, TrainConfig
from distill.training import newest_checkpoint, train
from tests.test_training import pairs


def main(spec: dict) -> None:
    rank = int(os.environ.get("RANK", "0"))
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    fields = dict(spec["train"])
    fields["kd"] = KDConfig(**fields.get("kd", {}))
    fields["lora"] = LoraConfig(**fields.get("lora", {}))
    fields["onpolicy"] = OnPolicyConfig(**fields.get("onpolicy", {"max_new_tokens": 12}))
    cfg = TrainConfig(**fields)

    asked: list[int] = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: asked.append(signum))
    calls = [0]

    def should_stop() -> bool:
        calls[0] += 1
        time.sleep(spec.get("step_sleep", 0.0))
        return bool(asked) or (rank == spec.get("stop_rank") and calls[0] >= spec["stop_after"])

    (out / f"pid-{rank}").write_text(str(os.getpid()))
    torch.manual_seed(0)  # LoRA adapters start from torch's generator, which is seeded per process
    result = train(spec["student"], pairs()[: spec.get("n_pairs", 32)], cfg, out, should_stop=should_stop,
                   progress=False, teacher_path=spec.get("teacher"), device="cpu")
    ckpt = newest_checkpoint(out / "checkpoints")
    history = json.loads((ckpt / "state.json").read_text())["history"] if ckpt else []
    (out / f"result-{rank}.json").write_text(json.dumps(
        {"rank": rank, "step": result.step, "loss": result.loss, "finished": result.finished,
         "resumed_from": result.resumed_from, "checkpoint": ckpt.name if ckpt else None, "history": history}))


if __name__ == "__main__":
    from distill.ranks import exit_rank

    main(json.loads(sys.argv[1]))
    exit_rank(0)
