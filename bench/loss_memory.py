"""Peak memory and time of the loss at a real vocabulary: the chunked LM head + loss of
`distill.chunked` against the same loss on the whole [positions, vocabulary] logits tensor.

One fresh process per measurement: it builds the inputs (hidden states, the head's weight with
its gradient, the teacher's rows), notes its resident memory, runs forward + backward of the
loss once, and reports the peak resident memory above that point and the time taken. The bytes
are the ones a GPU would allocate for the same tensors. Losses: SFT cross-entropy,
full-vocabulary forward KL against a teacher's head (with CE, alpha 0.5) and offline top-k
forward KL (k = 20, with CE); each with the head trained (a full fine-tune: its [V, H] float32
gradient, 0.9 GB here, is made by both paths and counted) and frozen (a LoRA student).

    .venv/bin/python bench/loss_memory.py                 # V 151,936, L 4096, hidden 1536
    .venv/bin/python bench/loss_memory.py --length 1024   # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("sft", "kd_full", "kd_topk")
PATHS = ("materialised", "chunked")

CHILD = r"""
import functools, json, resource, sys, time
import psutil, torch
sys.path.insert(0, {root!r})
from distill import divergences
from distill.chunked import CrossEntropy, full_head_loss, head_loss
import torch.nn.functional as F

case, path, n, h, v, k, chunk, head = {case!r}, {path!r}, {n}, {h}, {v}, {k}, {chunk}, {head!r}
torch.manual_seed(0)
hidden = torch.randn(n, h).requires_grad_()
# in place: a temporary of the weight's size here would raise the process's peak before the loss runs
weight = torch.empty(v, h).normal_(0, 0.02).requires_grad_(head == "trained")
rows = {{"target": torch.randint(0, v, (n,))}}
t_weight = None

def ce(logits, rows, w):
    return F.cross_entropy(logits, rows["target"], reduction="sum") * w

if case == "sft":  # what the train stage uses for it: cross-entropy with its gradient in place
    loss = CrossEntropy(1.0 / n)
elif case == "kd_full":
    t_weight = torch.empty(v, h).normal_(0, 0.02)
    rows["t_hidden"] = torch.randn(n, h)
    def loss(logits, rows):
        t_logits = rows["t_logits"] if "t_logits" in rows else rows["t_hidden"] @ t_weight.T
        div, _ = divergences.full_kd(logits, t_logits, "forward_kl")
        return ce(logits, rows, 0.5 / n) + 0.5 * div.sum() / n
else:
    top = torch.randn(n, k).log_softmax(-1).sort(-1, descending=True)
    rows["t_ids"], rows["t_logprobs"] = torch.randint(0, v, (n, k)), top.values
    def loss(logits, rows):
        div, _ = divergences.topk_kd(logits, rows["t_ids"], rows["t_logprobs"], "forward_kl")
        return ce(logits, rows, 0.5 / n) + 0.5 * div.sum() / n

base = psutil.Process().memory_info().rss
start = time.perf_counter()
if path == "materialised":
    if t_weight is not None:  # the teacher's full logits, as a forward of the teacher returns them
        with torch.no_grad():
            rows["t_logits"] = rows["t_hidden"] @ t_weight.T
    value = full_head_loss(hidden, weight, loss, rows)
else:
    value = head_loss(hidden, weight, loss, rows, chunk=chunk)
value.backward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"loss": value.item(), "seconds": seconds, "peak_bytes": peak - base}}))
"""


def measure(case: str, path: str, head: str, args: argparse.Namespace) -> dict:
    code = CHILD.format(root=str(ROOT), case=case, path=path, n=args.length, h=args.hidden, v=args.vocab, k=args.k,
                        chunk=args.chunk, head=head)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{case}/{path} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096, help="positions (batch 1; default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=1536, help="(default: %(default)s, Qwen2.5-1.5B)")
    parser.add_argument("--vocab", type=int, default=151_936, help="(default: %(default)s, Qwen2.5's head)")
    parser.add_argument("--k", type=int, default=20, help="stored teacher logprobs per token (default: %(default)s)")
    parser.add_argument("--chunk", type=int, default=256, help="positions per chunk (default: train.loss_chunk's)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, help="(default: all)")
    parser.add_argument("--head", nargs="+", default=["trained", "frozen"], choices=["trained", "frozen"],
                        help="the head's weight trained (full fine-tune) and/or frozen (LoRA) (default: both)")
    parser.add_argument("--rounds", type=int, default=1, help="measurements per cell; medians (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "loss_memory.json")
    args = parser.parse_args(argv)

    from statistics import median

    results: dict[str, dict[str, dict]] = {}
    for head in args.head:
        for case in args.cases:
            runs: dict[str, list[dict]] = {p: [] for p in PATHS}
            for _ in range(args.rounds):
                for path in PATHS:  # side by side, alternating
                    runs[path].append(measure(case, path, head, args))
            key = f"{case}, head {head}"
            results[key] = {p: {"peak_mb": round(median(r["peak_bytes"] for r in runs[p]) / 2**20, 1),
                                "seconds": round(median(r["seconds"] for r in runs[p]), 2),
                                "loss": runs[p][0]["loss"]} for p in PATHS}
            m, c = results[key]["materialised"], results[key]["chunked"]
            results[key]["memory_ratio"] = round(c["peak_mb"] / m["peak_mb"], 3)
            results[key]["time_ratio"] = round(c["seconds"] / m["seconds"], 3)
            print(f"  {key}: {c['peak_mb']} / {m['peak_mb']} MB, {c['seconds']} / {m['seconds']} s", file=sys.stderr)
    print(f"V {args.vocab}, L {args.length}, hidden {args.hidden}, chunk {args.chunk}, batch 1, float32 on "
          f"{__import__('os').cpu_count()} CPU(s); peak memory above the inputs, forward + backward; goal: "
          "memory <= 0.2x at time <= 1.3x")
    print("| loss | materialised MB | chunked MB | memory ratio | materialised s | chunked s | time ratio |")
    print("|---|---|---|---|---|---|---|")
    for case, r in results.items():
        m, c = r["materialised"], r["chunked"]
        print(f"| {case} | {m['peak_mb']} | {c['peak_mb']} | {r['memory_ratio']} | {m['seconds']} | {c['seconds']} | "
              f"{r['time_ratio']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
