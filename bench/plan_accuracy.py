"""How close `distill plan`'s training estimate comes to the memory a training run really takes.

Two Qwen2-shaped students with random weights (about 20M and 100M parameters, a trained
byte-level BPE vocabulary of 16k and 32k tokens) are trained for a few steps by distill's own
training loop (`distill.training.train`: a full fine-tune, fused AdamW, the chunked head and
loss), float32 on the CPU, with gradient checkpointing off and on. Each run is a fresh process;
its peak resident memory above the resident memory after its imports, read after every step
(before the final checkpoint is written, which a GPU job writes from host memory), is set
against `distill.memory.train_memory` for the same shape and settings. The tensors are the ones
a GPU would allocate; the host's allocator is not CUDA's, so the check is of the byte counts.

    .venv/bin/python bench/plan_accuracy.py               # both sizes, about 5 minutes here
    .venv/bin/python bench/plan_accuracy.py --cases 20M   # about 30 s
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen2 shapes: 2 KV heads like Qwen2.5-0.5B/1.5B, an MLP about 4x the width, tied embeddings.
CASES = {
    "20M": {"vocab": 16_000, "hidden": 384, "layers": 6, "heads": 6, "kv_heads": 2, "intermediate": 1536,
            "batch": 4, "length": 256},
    "100M": {"vocab": 32_000, "hidden": 768, "layers": 12, "heads": 12, "kv_heads": 2, "intermediate": 2048,
             "batch": 4, "length": 512},
}
# The optimizer's state is made at the end of step 1: step 2 is the first steady one.
STEPS = 2

CHILD = r"""
import json, resource, sys
sys.path.insert(0, {root!r})
import psutil, torch
from distill.train_config import TrainConfig
from distill.training import train

cfg = TrainConfig(**{cfg!r})
pairs = [tuple(p) for p in json.load(open({pairs!r}))]
# One step of a tiny model first: the imports and initialisations a first step triggers (about
# 165 MB here, no tensors) happen before the baseline is read.
train({warm!r}, pairs[:2], TrainConfig(max_steps=1, batch_size=2, max_length=cfg.max_length,
      gradient_checkpointing=cfg.gradient_checkpointing), {warm_out!r}, progress=False, device="cpu")
base = psutil.Process().memory_info().rss
peaks = []
def after_step():
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return False
train({model!r}, pairs, cfg, {out!r}, should_stop=after_step, progress=False, device="cpu")
print(json.dumps({{"base": base, "peaks": peaks}}))
"""
# glibc keeps freed memory in its heap for reuse, so a process's resident memory stays at its
# high-water mark of fragmented heap; with every allocation above 64 KiB in its own mapping,
# unmapped when freed, resident memory follows the live tensors as CUDA's allocated bytes do.
MALLOC = {"mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "default": {}}


def words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(n)]


def build(case: str, out: Path) -> Path:
    """Tokenizer and randomly initialised model of `case` under `out` (and a tiny model on the
    same tokenizer for the warm-up step); returns the model directory."""
    from distill.tiny import build_model, build_tokenizer

    shape = CASES[case]
    corpus = words(6 * shape["vocab"], seed=0)
    texts = [" ".join(corpus[i : i + 100]) for i in range(0, len(corpus), 100)]
    tokenizer = build_tokenizer(texts, out / "tokenizer", vocab_size=shape["vocab"])
    assert len(tokenizer) == shape["vocab"], (len(tokenizer), shape["vocab"])
    positions = 2 * shape["length"]
    build_model(out / "tokenizer", out / "warm", hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                intermediate_size=32, max_position_embeddings=positions)
    return build_model(out / "tokenizer", out / "model", hidden_size=shape["hidden"], num_layers=shape["layers"],
                       num_heads=shape["heads"], num_kv_heads=shape["kv_heads"],
                       intermediate_size=shape["intermediate"],
                       max_position_embeddings=positions)


def pairs(case: str, n: int = 32) -> list[tuple[str, str]]:
    """Examples as long as the batch allows: half reach max_length, the rest stop a little short,
    so batches are padded as real ones are (the attention mask is then not dropped)."""
    length = CASES[case]["length"]
    text = words(8 * length, seed=1)
    out = []
    for i in range(n):
        start = (i * 37) % (len(text) - 2 * length)
        take = 2 * length if i % 2 == 0 else int(length * (0.5 + 0.03 * (i % 10)))
        out.append((" ".join(text[start : start + 8]), " ".join(text[start + 8 : start + 8 + take])))
    return out


def train_config(case: str, checkpointing: bool) -> dict:
    shape = CASES[case]
    return {"lr": 1e-4, "max_steps": STEPS, "batch_size": shape["batch"], "max_length": shape["length"],
            "save_steps": 1000, "log_steps": 1000, "gradient_checkpointing": checkpointing}


def measure(model: Path, case: str, checkpointing: bool, work: Path, malloc: str = "mmap") -> int:
    """Peak resident bytes of the training steps above the process's baseline (a fresh process)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "pairs.json").write_text(json.dumps(pairs(case)))
    code = CHILD.format(root=str(ROOT), cfg=train_config(case, checkpointing), pairs=str(work / "pairs.json"),
                        warm=str(model.with_name("warm")), warm_out=str(work / "warm"), model=str(model),
                        out=str(work / "train"))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **MALLOC[malloc]}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{case} (checkpointing {checkpointing}) failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return max(result["peaks"]) - result["base"]


def estimate(model: Path, case: str, checkpointing: bool) -> dict:
    """`distill plan`'s training estimate for the same shape and settings (float32, one device)."""
    from distill.memory import Setup, read_shape, train_memory
    from distill.train_config import TrainConfig

    cfg = TrainConfig(**train_config(case, checkpointing))
    return train_memory(read_shape(str(model)), Setup.from_config(cfg, "fp32"))


def run(case: str, work: Path, mallocs: list[str]) -> list[dict]:
    """Estimate and measurements of `case` with checkpointing off and on."""
    from distill.memory import read_shape

    model = build(case, work / case)
    params = read_shape(str(model)).params
    rows = []
    for checkpointing in (False, True):
        plan = estimate(model, case, checkpointing)
        row = {"case": case, "params": params, "checkpointing": checkpointing, "estimate_bytes": plan["peak"],
               "phase": plan["phase"], "parts": plan["parts"]}
        for malloc in mallocs:
            row[f"measured_{malloc}_bytes"] = measured = measure(model, case, checkpointing,
                                                                 work / f"{case}-{checkpointing}-{malloc}", malloc)
            row[f"ratio_{malloc}"] = plan["peak"] / measured
            print(f"  {case} checkpointing {'on' if checkpointing else 'off'}, malloc {malloc}: estimate "
                  f"{plan['peak'] / 1e6:.0f} MB, measured {measured / 1e6:.0f} MB", file=sys.stderr)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--malloc", nargs="+", default=["mmap", "default"], choices=list(MALLOC),
                        help="mmap: large allocations unmapped when freed (the figure compared); default: glibc's "
                             "own heap, fragmentation included (default: both)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "plan_accuracy.json")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            rows += run(case, Path(tmp), args.malloc)
    head = "| model | parameters | batch × tokens | checkpointing | estimate MB (peak at) |"
    rule = "|---|---|---|---|---|"
    for malloc in args.malloc:
        head += f" measured MB ({malloc}) | estimate / measured |"
        rule += "---|---|"
    lines = [head, rule]
    for r in rows:
        shape = CASES[r["case"]]
        line = (f"| {r['case']} (h {shape['hidden']}, {shape['layers']} layers, V {shape['vocab']}) | "
                f"{r['params'] / 1e6:.1f}M | {shape['batch']} × {shape['length']} | "
                f"{'on' if r['checkpointing'] else 'off'} | {r['estimate_bytes'] / 1e6:.0f} ({r['phase']}) |")
        for malloc in args.malloc:
            line += f" {r[f'measured_{malloc}_bytes'] / 1e6:.0f} | {r[f'ratio_{malloc}']:.3f} |"
        lines.append(line)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": STEPS, "rows": rows}, indent=1))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
