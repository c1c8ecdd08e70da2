"""Grading throughput: math-verify in this process vs a process pool, side by side in one run.

Grades the gold solutions of MATH-500 (500) and GSM8K test (1319) against their gold answers
with `distill.grading.grade`, alternating `workers=1` (in the process) and the pool over
`--repeats` rounds, and prints answers/s for each and the pool's ratio to one worker. Every
measurement runs in a fresh Python process, as a verify job does: math-verify and sympy cache
what they parse, so a second grading in the same process would be measured warm.

    .venv/bin/python bench/grading_throughput.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.grading import grade  # noqa: E402, F401 (used by measure's subprocess)
from distill.jsonl import read_jsonl, write_json  # noqa: E402

BENCH = ROOT / "data" / "benchmarks"


def pairs() -> list[tuple[str, str]]:
    math500 = [(r["answer"], r["solution"]) for r in read_jsonl(BENCH / "math500_test.jsonl")]
    gsm8k = [(r["answer"], r["answer"]) for r in read_jsonl(BENCH / "gsm8k_test.jsonl")]
    return math500 + gsm8k


def measure(workers: int) -> tuple[float, int, int]:
    """(answers/s, correct, total) of one grading, in a fresh interpreter."""
    code = ("import time; import bench.grading_throughput as b; items = b.pairs(); "
            f"t = time.perf_counter(); r = b.grade(items, workers={workers}, progress=False); "
            "print(len(items) / (time.perf_counter() - t), sum(ok for _, ok in r), len(items))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    rate, correct, total = out.split()
    return float(rate), int(correct), int(total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="pool size (default: the CPUs of this machine, %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "grading_throughput.json")
    args = parser.parse_args(argv)
    layouts = {"in process (workers=1)": 1, f"pool (workers={args.workers})": args.workers}
    rates: dict[str, list[float]] = {k: [] for k in layouts}
    total = 0
    for r in range(args.repeats):
        for name in (list(layouts) if r % 2 == 0 else list(reversed(layouts))):
            rate, correct, total = measure(layouts[name])
            rates[name].append(rate)
            print(f"round {r}: {name}: {rate:.0f} answers/s ({correct}/{total} correct)", flush=True)
    base = statistics.median(rates["in process (workers=1)"])
    print(f"\n{total} answers (MATH-500 + GSM8K test gold solutions), "
          f"median of {args.repeats}, each in a fresh process")
    print("| layout | answers/s | vs in process |\n|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.0f} | {statistics.median(values) / base:.2f}x |")
    write_json(args.out, {"answers": total, "answers_per_s": rates})
    return 0


if __name__ == "__main__":
    sys.exit(main())
