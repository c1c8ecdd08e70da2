"""Training throughput: the project's training loop vs a plain `transformers.Trainer`, same
model, examples, batch size, optimizer settings and number of steps, interleaved in one process.

Both count the non-padding tokens of the batches they train on. The project's time runs from
its first step to its saved model, checkpoints included (one at the end, as `save_steps` is the
step count here); the Trainer's is `trainer.train()` with checkpoints off, then `save_model`. The ratio is the project's
tokens/s over the Trainer's (goal: >= 1.0). The Trainer pads each batch to its longest example;
the project runs both ways: padded, and packed (`train.packing`: a micro-batch's examples share
rows of up to `max_length` tokens, attention kept within each example).

    .venv/bin/python bench/training_throughput.py --steps 400 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import PromptConfig  # noqa: E402
from distill.jsonl import read_jsonl, write_json  # noqa: E402
from distill.prompts import build_prompt  # noqa: E402
from distill.train_config import TrainConfig  # noqa: E402
from distill.training import IGNORE, pad_rows, tokenize_pairs, train  # noqa: E402


def run_trainer(model_path: str, examples: list[dict[str, list[int]]], cfg: TrainConfig, out: Path) -> float:
    """tokens/s of `transformers.Trainer` on the same examples."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    tokens = 0

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        nonlocal tokens
        tokens += sum(len(ex["input_ids"]) for ex in batch)
        return {"input_ids": pad_rows([ex["input_ids"] for ex in batch], 0),
                "attention_mask": pad_rows([[1] * len(ex["input_ids"]) for ex in batch], 0),
                "labels": pad_rows([ex["labels"] for ex in batch], IGNORE)}

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    args = TrainingArguments(
        output_dir=str(out), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=int(cfg.warmup_ratio * cfg.max_steps), max_grad_norm=1.0,
        save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0, seed=cfg.seed, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate)
    start = time.perf_counter()
    trainer.train()
    trainer.save_model(str(out / "model"))  # as the project's time includes saving its model
    return tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny" / "student"),
                        help="model directory (default: the demo student)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per measurement (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s, the demo config's)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds, each running both in alternating order (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "training_throughput.json")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    records = read_jsonl(ROOT / "data" / "tiny" / "train.jsonl")
    pairs = [(build_prompt(tokenizer, PromptConfig(), r["question"]), r["solution"]) for r in records]
    cfg = TrainConfig(lr=0.01, max_steps=args.steps, batch_size=args.batch_size, warmup_ratio=0.05,
                      lr_scheduler="cosine", save_steps=args.steps, log_steps=50, max_length=128)
    examples = tokenize_pairs(tokenizer, pairs, cfg.max_length)
    rates: dict[str, list[float]] = {"transformers.Trainer": [], "distill train": [], "distill train, packed": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name in (list(rates) if r % 2 == 0 else list(reversed(rates))):
                out = Path(tmp) / f"{r}-{len(name)}"
                if name.startswith("distill"):
                    run_cfg = dataclasses.replace(cfg, packing=name.endswith("packed"))
                    rate = train(args.model, pairs, run_cfg, out, progress=False).tokens_per_s
                else:
                    rate = run_trainer(args.model, examples, cfg, out)
                rates[name].append(rate)
                print(f"round {r}: {name}: {rate:.0f} tokens/s", flush=True)
    base = rates["transformers.Trainer"]
    # The ratio of each round's pair, then the median: a slow spell of a shared machine moves
    # both sides of a pair, not one median.
    ratio = {name: statistics.median(a / b for a, b in zip(values, base, strict=True))
             for name, values in rates.items()}
    print(f"\n{len(examples)} examples, batch {args.batch_size}, {args.steps} steps, median of {args.repeats} rounds")
    print("| loop | tokens/s | vs Trainer (median of the rounds' ratios) |\n|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.0f} | {ratio[name]:.3f} |")
    write_json(args.out, {"rates": rates, "ratio": ratio, "goal": 1.0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
