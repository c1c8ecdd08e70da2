"""On-policy distillation's sampling, side by side: transformers' `generate` on the training
device (one example at a time) against a vLLM engine in the train job whose weights are pushed
from the student before each step (`train.onpolicy.sampler`).

Each sampler trains the same student for `--steps` steps of `onpolicy` (lmbda 1: every
micro-batch sampled) and the run reports wall time per step, the tokens sampled, and for vLLM
the engine's start and the weight pushes (the cost of keeping the engine on-policy). Models: the
demo's student distilled from the demo teacher, and SmolLM2-135M-Instruct (`make real-model`)
as its own teacher with LoRA adapters, on GSM8K questions. Run it in `.venv-vllm`:

    .venv-vllm/bin/python bench/onpolicy_sampling.py
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import PromptConfig  # noqa: E402
from distill.jsonl import read_jsonl, write_json  # noqa: E402
from distill.train_config import LoraConfig, OnPolicyConfig, TrainConfig  # noqa: E402

GSM8K = ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"


class Timed:
    """Seconds spent in the vLLM sampler's methods, summed (wrapped around the class)."""

    def __init__(self) -> None:
        from distill.policy_sampling import VLLMSampler

        self.seconds = {"__init__": 0.0, "sync": 0.0, "sample": 0.0}
        self.tokens = 0
        for name in self.seconds:
            setattr(VLLMSampler, name, self.wrap(name, getattr(VLLMSampler, name)))

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[name] += time.perf_counter() - start
            if name == "sample":
                self.tokens += sum(len(c) for c in out)
            return out
        return timed


def run(name: str, student: Path, teacher: Path, pairs: list[tuple[str, str]], sampler: str, args,
        timed: Timed) -> dict:
    from distill.training import train

    lora = LoraConfig(enabled=True, r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]) \
        if "SmolLM2" in name else LoraConfig()
    cfg = TrainConfig(lr=1e-4, max_steps=args.steps, batch_size=args.batch_size, save_steps=args.steps,
                      log_steps=1, max_length=512, objective="onpolicy", lora=lora, report_to=[],
                      onpolicy=OnPolicyConfig(max_new_tokens=args.max_new_tokens, sampler=sampler))
    before = dict(timed.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(student, pairs, cfg, Path(tmp) / "out", progress=False, teacher_path=teacher)
        wall = time.perf_counter() - start
    row = {"model": name, "sampler": sampler, "steps": args.steps, "batch": args.batch_size,
           "wall_s": round(wall, 1), "s_per_step": round(wall / args.steps, 2)}
    if sampler == "vllm":
        spent = {k: timed.seconds[k] - before[k] for k in timed.seconds}
        row |= {"engine_start_s": round(spent["__init__"], 1), "push_s_per_step": round(spent["sync"] / args.steps, 2),
                "sample_s_per_step": round(spent["sample"] / args.steps, 2)}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="(default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "onpolicy_sampling.json")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from distill.prompts import build_prompt

    timed = Timed()
    tiny = ROOT / "models" / "tiny"
    tok = AutoTokenizer.from_pretrained(tiny / "student")
    demo = [(build_prompt(tok, PromptConfig(), r["question"]), r["solution"])
            for r in read_jsonl(ROOT / "data" / "tiny" / "train.jsonl")[:64]]
    models = [("demo student", tiny / "student", tiny / "teacher", demo)]
    real = ROOT / "models" / "smollm2-135m-instruct"
    if (real / "model.safetensors").exists() and GSM8K.exists():
        tok = AutoTokenizer.from_pretrained(real)
        gsm8k = [(build_prompt(tok, PromptConfig(), r["question"]), r["answer"])
                 for r in read_jsonl(GSM8K)[:64]]
        models.append(("SmolLM2-135M (LoRA), GSM8K", real, real, gsm8k))
    else:
        print(f"bench: {real} or {GSM8K} missing (make real-model): the real model not measured")
    rows = [run(name, student, teacher, pairs, sampler, args, timed)
            for name, student, teacher, pairs in models for sampler in ("transformers", "vllm")]
    print(f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, fp32")
    print("| model | sampler | steps × batch | s/step | vLLM start s | push s/step | sample s/step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['sampler']} | {r['steps']} × {r['batch']} | {r['s_per_step']} | "
              f"{r.get('engine_start_s', '-')} | {r.get('push_s_per_step', '-')} | {r.get('sample_s_per_step', '-')} |")
    write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
