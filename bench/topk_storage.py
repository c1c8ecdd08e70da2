"""Stored teacher logprobs for offline KD: bytes per completion token for k = 20 and 64.

Captures the demo teacher's top-k logprobs over the completions of `--examples` training
rationales exactly as an offline-KD training run does (`capture_topk`, saved as safetensors:
int32 ids + float16 logprobs + int64 offsets per example) and reports the file's bytes per
token beside the 6·k bytes of the payload alone.

    .venv/bin/python bench/topk_storage.py --examples 1000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import PromptConfig  # noqa: E402
from distill.distillation import capture_topk  # noqa: E402
from distill.jsonl import read_jsonl, write_json  # noqa: E402
from distill.prompts import build_prompt  # noqa: E402
from distill.training import tokenize_pairs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(ROOT / "models" / "tiny" / "teacher"),
                        help="(default: the demo teacher)")
    parser.add_argument("--examples", type=int, default=1000, help="training rationales (default: %(default)s)")
    parser.add_argument("--k", type=int, nargs="+", default=[20, 64], help="(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "topk_storage.json")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    records = read_jsonl(ROOT / "data" / "tiny" / "train.jsonl")[: args.examples]
    pairs = [(build_prompt(tokenizer, PromptConfig(), r["question"]), r["solution"]) for r in records]
    examples = tokenize_pairs(tokenizer, pairs, 128)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.k:
            store = capture_topk(teacher, examples, k, len(tokenizer))
            path = Path(tmp) / f"teacher-top{k}.safetensors"
            store.save(path, {"k": str(k)})
            tokens = int(store.ids.size(0))
            rows.append({"k": k, "tokens": tokens, "file_bytes": path.stat().st_size,
                         "bytes_per_token": round(path.stat().st_size / tokens, 1), "payload_per_token": 6 * k})
    print(f"{len(examples)} rationales, {rows[0]['tokens']} completion tokens")
    print("| k | file bytes | bytes/token | ids + logprobs alone (6·k) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['file_bytes']} | {r['bytes_per_token']} | {r['payload_per_token']} |")
    write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
