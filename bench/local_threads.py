"""Torch threads of local jobs: training speed at each thread count, on a quiet machine and beside
other work, and the count the local executor picks (`jobs.executors.local_threads`).

Each measurement is a fresh process training the demo student with `distill.training.train` at a
given `torch.set_num_threads`; "busy" runs it beside one process that keeps a core busy, "pair"
runs two such trainings at once (two local jobs of one stage). Rounds alternate the order.

    .venv/bin/python bench/local_threads.py --steps 60 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.jsonl import write_json  # noqa: E402

CHILD = """
import json, sys, torch
from pathlib import Path
torch.set_num_threads(int(sys.argv[1]))
from transformers import AutoTokenizer
from distill.config import PromptConfig
from distill.train_config import TrainConfig
from distill.jsonl import read_jsonl
from distill.prompts import build_prompt
from distill.training import train
model = "models/tiny/student"
tok = AutoTokenizer.from_pretrained(model)
pairs = [(build_prompt(tok, PromptConfig(), r["question"]), r["solution"]) for r in read_jsonl("data/tiny/train.jsonl")]
cfg = TrainConfig(lr=0.01, max_steps=int(sys.argv[2]), batch_size=32, save_steps=10**6, log_steps=10**6, max_length=128)
print(json.dumps({"tokens_per_s": train(model, pairs, cfg, Path(sys.argv[3]), progress=False).tokens_per_s}))
"""

SPIN = "while True:\n    pass\n"


def trainings(threads: int, steps: int, count: int, tmp: Path) -> list[float]:
    """tokens/s of `count` trainings run at once, each at `threads` torch threads."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(threads), str(steps),
                               str(tmp / f"{time.time_ns()}-{i}")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) for i in range(count)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1])["tokens_per_s"] for p in procs]


def measure(scenario: str, threads: int, steps: int, tmp: Path) -> float:
    """Median tokens/s of one training (of the pair's two, in "pair")."""
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if scenario == "busy" else None
    try:
        rates = trainings(threads, steps, 2 if scenario == "pair" else 1, tmp)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    from jobs.executors import local_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per training (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "local_threads.json")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    counts = sorted({1, cores})
    scenarios = ("quiet", "busy", "pair")
    rates: dict[str, dict[int, list[float]]] = {s: {t: [] for t in counts} for s in scenarios}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for scenario in scenarios:
                for t in (counts if r % 2 == 0 else counts[::-1]):
                    rate = measure(scenario, t, args.steps, Path(tmp))
                    rates[scenario][t].append(rate)
                    print(f"round {r}: {scenario}, {t} thread(s): {rate:.0f} tokens/s", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {cores} cores; demo student, batch 32, {args.steps} steps, median of "
          f"{args.repeats} rounds (tokens/s of one training)")
    print("| scenario | " + " | ".join(f"{t} thread(s)" for t in counts) + " | 1 vs most |\n|---|"
          + "---|" * (len(counts) + 1))
    for scenario in scenarios:
        med = {t: statistics.median(v) for t, v in rates[scenario].items()}
        print(f"| {scenario} | " + " | ".join(f"{med[t]:.0f}" for t in counts) + f" | {med[1] / med[counts[-1]]:.2f} |")
    print(f"local executor picks: {local_threads(1)} thread(s) for one job now, {local_threads(2)} each for two")
    write_json(args.out, {"cores": cores, "steps": args.steps, "rates": {s: {str(t): v for t, v in d.items()}
                                                                         for s, d in rates.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
