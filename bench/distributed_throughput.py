"""Data-parallel training throughput: 2 ranks x 1 CPU against 1 rank x 1 CPU, on the same
model, examples, global batch and number of steps, side by side (alternating) in one run.

Each measurement is `torchrun --standalone` of this script's worker, which calls
`distill.training.train` (gloo on the CPU, one OpenMP thread per process, each process pinned to
a core of its own with `taskset` where it exists). The figure is the training loop's own: the
non-padding tokens of the global batches over the loop's wall time (the final checkpoint and
model save included), as rank 0 reports it. Goal: 2 ranks >= 1.6x one rank.

Where the rest goes comes from two more measurements in the same rounds, so the ratio splits
into three factors that multiply to it:
- half batches: one process on half the global batch, alone, over one rank's tokens/s: whether
  a rank's smaller batch runs less efficiently;
- sharing the machine: two such processes at once on the two cores, with no communication at
  all (their tokens/s added, over twice the alone figure): memory bandwidth and caches the two
  cores share;
- communication: two DDP ranks over those two independent processes: the gradient all-reduce
  over gloo, the stop flag's and loss's small all-reduces, and each step waiting for the slower
  rank.

    .venv/bin/python bench/distributed_throughput.py --steps 60 --repeats 3
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

    from distill.config import PromptConfig
    from distill.jsonl import read_jsonl
    from distill.modeling import load_tokenizer
    from distill.prompts import build_prompt
    from distill.train_config import TrainConfig
    from distill.training import train

    torch.set_num_threads(1)
    if spec["ranks"] > 1 and hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= spec["ranks"]:
        local = int(os.environ["LOCAL_RANK"])  # each rank on a core of its own, as each lone process is
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[local]})
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


def command(spec: dict, ranks: int, cores: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    return ["taskset", "-c", cores, *cmd] if shutil.which("taskset") and (os.cpu_count() or 1) >= 2 else cmd


def measure(spec: dict, tmp: Path, tag: str, runs: list[tuple[int, int, str]]) -> list[dict]:
    """Start the (ranks, batch, cores) runs at once, wait for all; rank 0's figures of each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = []
    for i, (ranks, batch, cores) in enumerate(runs):
        one = {**spec, "ranks": ranks, "batch_size": batch, "out": str(tmp / f"{tag}-{i}"),
               "report": str(tmp / f"{tag}-{i}.json")}
        procs.append((one, subprocess.Popen(command(one, ranks, cores), cwd=ROOT, env=env, text=True,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    reports = []
    for one, proc in procs:
        _, err = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"{tag}: torchrun failed:\n{err[-3000:]}")
        reports.append(json.loads(Path(one["report"]).read_text()))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return reports


KINDS = {  # name -> the runs started at once: (ranks, share of the global batch, cores)
    "1 rank": [(1, 1, "0")],
    "1 rank, half batch": [(1, 2, "0")],
    "2 processes, half batch each, no communication": [(1, 2, "0"), (1, 2, "1")],
    "2 ranks (ddp)": [(2, 1, "0-1")],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny" / "teacher"),
                        help="model to train (default: the demo teacher, 128 wide, 4 layers)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per measurement (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, each running all four (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "distributed_throughput.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0

    from safetensors import safe_open

    with safe_open(str(Path(args.model) / "model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (a safetensors handle)
    spec = {"model": args.model, "steps": args.steps, "params": params}
    rates: dict[str, list[float]] = {k: [] for k in KINDS}
    step_ms: dict[str, list[float]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = list(KINDS) if r % 2 == 0 else list(reversed(KINDS))
            for kind in order:
                runs = [(n, args.batch_size // share, cores) for n, share, cores in KINDS[kind]]
                reports = measure(spec, Path(tmp) / "m", f"{r}", runs)
                rates[kind].append(sum(m["tokens_per_s"] for m in reports))
                step_ms[kind].append(max(m["train_s"] for m in reports) / args.steps * 1000)
                losses = ", ".join(f"{m['loss']:.4f}" for m in reports)
                print(f"round {r}: {kind}: {rates[kind][-1]:.0f} tokens/s, loss {losses}", flush=True)
    one = {k: statistics.median(v) for k, v in rates.items()}
    ratio = {k: statistics.median(v / base for v, base in zip(rates[k], rates["1 rank"], strict=True)) for k in KINDS}
    half = one["1 rank, half batch"] / one["1 rank"]
    shared = one["2 processes, half batch each, no communication"] / (2 * one["1 rank, half batch"])
    comm = one["2 ranks (ddp)"] / one["2 processes, half batch each, no communication"]
    print(f"\n{params / 1e6:.1f}M parameters, global batch {args.batch_size}, {args.steps} steps, "
          f"median of {args.repeats} rounds")
    print("| run | tokens/s | vs 1 rank | train() per step, ms |\n|---|---|---|---|")
    for kind in KINDS:
        print(f"| {kind} | {one[kind]:.0f} | {ratio[kind]:.2f}x | {statistics.median(step_ms[kind]):.1f} |")
    print(f"\n2 ranks vs 1: {ratio['2 ranks (ddp)']:.2f}x (goal 1.6x) = 2 x half batches {half:.2f} x sharing the "
          f"machine {shared:.2f} x communication {comm:.2f} (medians; the product is {2 * half * shared * comm:.2f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tokens_per_s": rates, "step_ms": step_ms, "ratio": ratio,
                                    "factors": {"half_batches": half, "sharing": shared, "communication": comm},
                                    "goal": 1.6}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
