"""vLLM generation: distill's vLLM backend vs vLLM's own `LLM.generate`, and vLLM vs the
transformers backend, on the same model, prompts and greedy decoding, interleaved in one process.

Runs in `.venv-vllm` (the CPU build of vLLM; on a GPU node, the GPU environment):

    .venv-vllm/bin/python bench/vllm_generation.py --problems 800 --repeats 4

Three paths over the same prompts, in rotating order each round:
- `vLLM LLM.generate`: one call over all prompts with the same SamplingParams, texts kept in memory;
- `distill generate_shard (vLLM)`: what a generation job runs: `VLLMBackend` on the same engine,
  records appended and fsynced per call, resume bookkeeping (goal: >= 0.95x the former);
- `distill generate_shard (transformers)`: the same shard writer on `TransformersBackend`,
  left-padded batches of `--batch-size`, in the same dtype.
Ratios are per round, then the median, so a slow spell of a shared machine moves both sides.
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
from distill.generation import Engine, SamplingSpec, TransformersBackend, VLLMBackend, generate_shard  # noqa: E402
from distill.jsonl import read_jsonl, write_json  # noqa: E402
from distill.prompts import build_prompt  # noqa: E402

PLAIN, OURS, HF = "vLLM LLM.generate", "distill generate_shard (vLLM)", "distill generate_shard (transformers)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny" / "teacher"),
                        help="(default: the demo teacher)")
    parser.add_argument("--problems", type=int, default=800, help="prompts per measurement (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=100,
                        help="transformers batch (default: %(default)s, the demo's)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--dtype", default="fp32", choices=["bf16", "fp32"],
                        help="both backends (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=4, help="rounds (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "vllm_generation.json")
    args = parser.parse_args(argv)

    engine = VLLMBackend(args.model, Engine("vllm", dtype=args.dtype))
    hf = TransformersBackend(args.model, device="cpu", dtype=args.dtype)
    problems = read_jsonl(ROOT / "data" / "tiny" / "train.jsonl")[: args.problems]
    tasks = [{"id": p["id"], "prompt": build_prompt(hf.tokenizer, PromptConfig(), p["question"])} for p in problems]
    prompts = [t["prompt"] for t in tasks]
    spec = SamplingSpec(max_new_tokens=args.max_new_tokens)
    rates: dict[str, list[float]] = {PLAIN: [], OURS: [], HF: []}
    texts: dict[str, list[str]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                names = list(rates)
                for name in names[r % 3:] + names[: r % 3]:
                    out = Path(tmp) / f"{r}-{len(texts)}-{name[-6:-1]}.jsonl"
                    start = time.perf_counter()
                    if name == PLAIN:
                        outputs = engine.llm.generate(prompts, engine.sampling_params(spec, 0), use_tqdm=False)
                        texts[name] = [o.outputs[0].text for o in outputs]
                    else:
                        generate_shard(engine if name == OURS else hf, tasks, out, spec, args.batch_size,
                                       progress=False)
                    seconds = time.perf_counter() - start
                    if name != PLAIN:
                        texts[name] = [rec["response"] for rec in read_jsonl(out)]
                    rates[name].append(len(tasks) / seconds)
                    print(f"round {r}: {name}: {len(tasks) / seconds:.0f} records/s", flush=True)
    finally:
        engine.close()
    ratio = {name: statistics.median(a / b for a, b in zip(values, rates[PLAIN], strict=True))
             for name, values in rates.items()}
    same = {name: sum(a == b for a, b in zip(texts[name], texts[PLAIN], strict=True)) for name in (OURS, HF)}
    print(f"\n{args.model}: {len(tasks)} prompts, greedy, {args.max_new_tokens} new tokens at most, {args.dtype}, "
          f"median of {args.repeats} rounds")
    print("| path | records/s | vs vLLM LLM.generate | texts equal to LLM.generate's |\n|---|---|---|---|")
    for name, values in rates.items():
        equal = f"{same[name]}/{len(tasks)}" if name in same else "-"
        print(f"| {name} | {statistics.median(values):.0f} | {ratio[name]:.3f} | {equal} |")
    write_json(args.out, {"rates": rates, "ratio": ratio, "same_texts": same, "goal": 0.95})
    return 0


if __name__ == "__main__":
    sys.exit(main())
