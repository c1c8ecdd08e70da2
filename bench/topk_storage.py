"""Stored teacher logprobs for offline KD: bytes per (token, k) entry and reconstruction error,
the int32 ids + float16 logprobs format beside the coded one (`distill.topk_store`).

The demo teacher scores `--examples` demo training rationales, and SmolLM2-135M-Instruct (when
`make real-model` has put it in models/) scores `--real-examples` GSM8K training solutions, both
as an offline-KD training run tokenizes them (prompt masked, completion scored). The error is,
per completion token, KL(p‖p̂) in nats between the float32 top-k distribution renormalised over
its k ids and the stored one, as training reads it. Both formats are written to disk and
measured there, file overhead included.

    .venv/bin/python bench/topk_storage.py
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import PromptConfig  # noqa: E402
from distill.jsonl import read_jsonl, write_json  # noqa: E402
from distill.prompts import build_prompt  # noqa: E402
from distill.training import tokenize_pairs  # noqa: E402

GSM8K = ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"


def scores(model_dir: Path, records: list[dict], k: int):
    """(ids [N, k], float32 logprobs [N, k], offsets) of the model's top-k over the completions."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.distillation import teacher_topk

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pairs = [(build_prompt(tokenizer, PromptConfig(), r["question"]), r["completion"]) for r in records]
    ids, logprobs, offsets = [], [], [0]
    for top_ids, lp, counts in teacher_topk(model, tokenize_pairs(tokenizer, pairs, 512), k, len(tokenizer)):
        ids.append(top_ids)
        logprobs.append(lp)
        for n in counts:
            offsets.append(offsets[-1] + n)
    return torch.cat(ids), torch.cat(logprobs), torch.tensor(offsets)


def measure(ids, logprobs, offsets, k: int, tmp: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    from distill.topk_store import TopKStore, gap_codes, renormalised_kl

    ids, logprobs = ids[:, :k].contiguous(), logprobs[:, :k].contiguous()
    entries = ids.numel()
    old_path, new_path = tmp / f"old-{k}.safetensors", tmp / f"new-{k}.safetensors"
    save_file({"ids": ids, "logprobs": logprobs.half(), "offsets": offsets}, str(old_path))
    TopKStore.encode(ids, gap_codes(logprobs), offsets).save(new_path, {})
    store, _ = TopKStore.load(new_path)
    decoded = [store.rows(i) for i in range(len(offsets) - 1)]
    assert torch.cat([d[0] for d in decoded]).equal(ids.long())
    old_err = renormalised_kl(logprobs, logprobs.half())
    new_err = renormalised_kl(logprobs, torch.cat([d[1] for d in decoded]))
    return {"k": k, "tokens": ids.size(0),
            "old_bytes_per_entry": round(old_path.stat().st_size / entries, 3),
            "old_kl_mean": float(old_err.mean()), "old_kl_max": float(old_err.max()),
            "new_bytes_per_entry": round(new_path.stat().st_size / entries, 3),
            "new_kl_mean": float(new_err.mean()), "new_kl_max": float(new_err.max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1000, help="demo rationales (default: %(default)s)")
    parser.add_argument("--real-examples", type=int, default=100,
                        help="GSM8K solutions scored by SmolLM2-135M (0: skip; default: %(default)s)")
    parser.add_argument("--k", type=int, nargs="+", default=[20, 64], help="(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "topk_storage.json")
    args = parser.parse_args(argv)

    demo = [{"question": r["question"], "completion": r["solution"]}
            for r in read_jsonl(ROOT / "data" / "tiny" / "train.jsonl")[: args.examples]]
    models = [("demo teacher", ROOT / "models" / "tiny" / "teacher", demo)]
    real = ROOT / "models" / "smollm2-135m-instruct"
    if args.real_examples and (real / "model.safetensors").exists() and GSM8K.exists():
        gsm8k = [{"question": r["question"], "completion": r["answer"]}
                 for r in read_jsonl(GSM8K)[: args.real_examples]]
        models.append(("SmolLM2-135M, GSM8K", real, gsm8k))
    else:
        print(f"bench: {real} or {GSM8K} missing (make real-model): the real model's scores not measured")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, records in models:
            ids, logprobs, offsets = scores(path, records, max(args.k))
            rows += [{"model": name, "examples": len(records), **measure(ids, logprobs, offsets, k, Path(tmp))}
                     for k in args.k]
    print(f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs")
    print("| teacher | k | tokens | int32 + float16 B/entry | KL mean / max | coded B/entry | KL mean / max |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} ({r['examples']} examples) | {r['k']} | {r['tokens']} | {r['old_bytes_per_entry']} | "
              f"{r['old_kl_mean']:.1e} / {r['old_kl_max']:.1e} | {r['new_bytes_per_entry']} | "
              f"{r['new_kl_mean']:.1e} / {r['new_kl_max']:.1e} |")
    write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
