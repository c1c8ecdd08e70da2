"""Data-parallel training throughput: 2 ranks x 1 CPU against 1 rank x 1 CPU, on the same
model, examples, global batch and number of steps, side by side (alternating) in one run.

Each measurement is `torchrun --standalone --nproc_per_node N` of this script's worker, which
calls `distill.training.train` with `train.distributed: ddp` (gloo on the CPU) and one OpenMP
thread per rank; with `taskset` on PATH each rank's process group is pinned to its own cores.
The figure is the training loop's own: the non-padding tokens of the global batches over the
loop's wall time (the final checkpoint and model save included), as rank 0 reports it. Goal:
2 ranks >= 1.6x one rank. Beside it: train()'s wall time per step on one and on two ranks, to
see what two ranks pay beyond half the work.

    .venv/bin/python bench/distributed_throughput.py --steps 60 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(spec: dict) -> None:
    """One rank of one measurement (started by torchrun): train, and report rank 0's figures."""
    import torch

    from distill.config import PromptConfig, TrainConfig
    from distill.jsonl import read_jsonl
    from distill.modeling import load_tokenizer
    from distill.prompts import build_prompt
    from distill.training import train

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(spec["model"])
    records = read_jsonl(ROOT / "data" / "tiny" / "train.jsonl")
    pairs = [(build_prompt(tokenizer, PromptConfig(), r["question"]), r["solution"]) for r in records]
    cfg = TrainConfig(lr=0.003, max_steps=spec["steps"], batch_size=spec["batch_size"], save_steps=spec["steps"],
                      log_steps=spec["steps"], max_length=128, distributed="ddp" if spec["ranks"] > 1 else "none")
    started = time.perf_counter()
    result = train(spec["model"], pairs, cfg, spec["out"], progress=False, device="cpu")
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["report"]).write_text(json.dumps({"tokens_per_s": result.tokens_per_s, "step": result.step,
                                                     "loss": result.loss, "train_s": time.perf_counter() - started}))


def measure(spec: dict, ranks: int, tmp: Path, tag: str) -> dict:
    out = tmp / tag
    report = tmp / f"{tag}.json"
    spec = {**spec, "ranks": ranks, "out": str(out), "report": str(report)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    if shutil.which("taskset") and (os.cpu_count() or 1) >= ranks:
        cmd = ["taskset", "-c", f"0-{ranks - 1}", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{tag}: torchrun failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(report.read_text()), "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny" / "teacher"),
                        help="model to train (default: the demo teacher, 128 wide, 4 layers)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per measurement (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds, each running both (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "distributed_throughput.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0

    from safetensors import safe_open

    with safe_open(str(Path(args.model) / "model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (a safetensors handle)
    spec = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "params": params}
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for ranks in ((1, 2) if r % 2 == 0 else (2, 1)):
                m = measure(spec, ranks, Path(tmp), f"{r}-{ranks}")
                runs[ranks].append(m)
                print(f"round {r}: {ranks} rank(s): {m['tokens_per_s']:.0f} tokens/s, loss {m['loss']:.4f}, "
                      f"wall {m['wall_s']:.1f} s", flush=True)
    one = statistics.median(m["tokens_per_s"] for m in runs[1])
    two = statistics.median(m["tokens_per_s"] for m in runs[2])
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(runs[1], runs[2], strict=True)]
    print(f"\n{params / 1e6:.1f}M parameters, global batch {args.batch_size}, {args.steps} steps, "
          f"median of {args.repeats} rounds")
    print("| ranks x CPUs | tokens/s | vs 1 rank |\n|---|---|---|")
    print(f"| 1 x 1 | {one:.0f} | 1.00x |")
    print(f"| 2 x 1 | {two:.0f} | {statistics.median(ratios):.2f}x |")
    step_ms = {n: statistics.median(m["train_s"] for m in runs[n]) / args.steps * 1000 for n in runs}
    print(f"train() per step, loading and saving included: {step_ms[1]:.1f} ms on one rank, {step_ms[2]:.1f} ms "
          f"on two (ideal {step_ms[1] / 2:.1f}); the difference is what two ranks pay beyond half the work: the "
          f"gradient all-reduce of {params / 1e6:.1f}M values over gloo, the work both ranks repeat (optimizer, "
          "clipping, loading, saving) and half-size batches. Goal: 1.6x.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": {str(k): v for k, v in runs.items()}, "ratio": statistics.median(ratios),
                                    "step_ms": step_ms, "goal": 1.6}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
