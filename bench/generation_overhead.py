"""Generation overhead: the project's shard writer and transformers backend vs a plain
`model.generate` loop, same model, prompts, batch size and decoding, interleaved in one process.

The project's path is what a generation job runs (`generate_shard` with `TransformersBackend`:
left-padded batches, per-record JSON lines appended and fsynced per batch, resume bookkeeping);
the plain loop tokenizes, generates and decodes, and keeps the texts in memory. The ratio is the
project's records/s over the plain loop's (goal: >= 0.95).

    .venv/bin/python bench/generation_overhead.py --problems 800 --repeats 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import PromptConfig  # noqa: E402
from distill.generation import SamplingSpec, TransformersBackend, generate_shard  # noqa: E402
from distill.jsonl import read_jsonl, write_json  # noqa: E402
from distill.prompts import build_prompt  # noqa: E402


def plain_loop(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[str]:
    import torch

    texts = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny" / "teacher"),
                        help="model directory (default: the demo teacher)")
    parser.add_argument("--problems", type=int, default=800, help="prompts per measurement (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=100, help="(default: %(default)s, the demo config's)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=6,
                        help="rounds, each running both in alternating order (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "generation_overhead.json")
    args = parser.parse_args(argv)

    backend = TransformersBackend(args.model, device="cpu")
    problems = read_jsonl(ROOT / "data" / "tiny" / "train.jsonl")[: args.problems]
    prompt_cfg = PromptConfig()
    tasks = [{"id": p["id"], "prompt": build_prompt(backend.tokenizer, prompt_cfg, p["question"])} for p in problems]
    spec = SamplingSpec(max_new_tokens=args.max_new_tokens)
    rates: dict[str, list[float]] = {"plain model.generate loop": [], "distill generate_shard": []}
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = list(rates) if r % 2 == 0 else list(reversed(rates))
            for name in order:
                start = time.perf_counter()
                if name.startswith("plain"):
                    texts = plain_loop(backend.model, backend.tokenizer, [t["prompt"] for t in tasks],
                                       args.batch_size, args.max_new_tokens)
                else:
                    out = Path(tmp) / f"round-{r}.jsonl"
                    generate_shard(backend, tasks, out, spec, args.batch_size, progress=False)
                seconds = time.perf_counter() - start
                rates[name].append(len(tasks) / seconds)
                print(f"round {r}: {name}: {len(tasks) / seconds:.0f} records/s", flush=True)
            same = same and [rec["response"] for rec in read_jsonl(out)] == texts
    plain = rates["plain model.generate loop"]
    # The ratio of each round's pair, then the median: a slow spell of a shared machine moves
    # both sides of a pair, not one median.
    ratio = {name: statistics.median(a / b for a, b in zip(values, plain, strict=True))
             for name, values in rates.items()}
    print(f"\n{len(tasks)} prompts, batch {args.batch_size}, greedy, {args.max_new_tokens} new tokens at most, "
          f"median of {args.repeats} rounds; same texts: {same}")
    print("| path | records/s | vs plain (median of the rounds' ratios) |\n|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.0f} | {ratio[name]:.3f} |")
    write_json(args.out, {"rates": rates, "ratio": ratio["distill generate_shard"], "same_texts": same, "goal": 0.95})
    return 0


if __name__ == "__main__":
    sys.exit(main())
