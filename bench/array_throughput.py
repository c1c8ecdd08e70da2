"""Teacher generation through SLURM: one array task vs two, side by side in one run.

Runs the generate stage of the demo config through the driver on the local SLURM cluster
(`make slurm-up`) in three layouts, each in a fresh run directory:

  1 task x 1 CPU    the baseline
  1 task x 2 CPUs   the whole machine, one process with two torch threads
  2 tasks x 1 CPU   the whole machine as an array of two shards

and prints per layout the records/s over the driver's wall time (start to merged stage, so
submission, queueing and model loading count) and the generation tokens/s inside the jobs
(all shards' new tokens over the slowest shard's generation time), each with its ratio to the
baseline. The layouts alternate over
`--repeats` rounds so that a slow spell of a shared machine does not land on one layout only.

    .venv/bin/python bench/array_throughput.py --problems 4000 --repeats 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.jsonl import write_json  # noqa: E402
from distill.manifest import Manifest  # noqa: E402

LAYOUTS = {"1 task x 1 CPU": (1, 1), "1 task x 2 CPUs": (1, 2), "2 tasks x 1 CPU": (2, 1)}


def run_layout(work: Path, name: str, shards: int, cpus: int, problems: int, samples: int) -> tuple[float, float]:
    """(driver seconds, generation tokens/s) for `problems` x `samples` records."""
    profile = yaml.safe_load((ROOT / "configs" / "cluster" / "local.yaml").read_text())
    profile.update(cpus=cpus, array_parallelism=2)
    profile_path = work / f"{name}.yaml"
    profile_path.write_text(yaml.safe_dump(profile))
    sets = [f"run_root={work / 'runs'}", f"data.train_limit={problems}", f"generation.num_shards={shards}",
            "generation.batch_size=32", f"generation.n={samples}",
            f"generation.temperature={0.7 if samples > 1 else 0}"]
    cmd = [sys.executable, "-m", "jobs.driver", "--config", "configs/tiny.yaml", "--executor", "slurm",
           "--cluster", str(profile_path), "--stages", "generate", "--run", name]
    cmd += [a for s in sets for a in ("--set", s)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{name}: driver failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    entry = Manifest(work / "runs" / name).stage(0, "generate")
    assert entry["state"] == "done" and entry["metrics"]["records"] == problems * samples, entry
    shards_done = entry["shards"].values()
    return elapsed, sum(s["new_tokens"] for s in shards_done) / max(s["seconds"] for s in shards_done)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=4000, help="problems to generate (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=2, help="samples per problem (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the layouts (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "array_throughput.json")
    args = parser.parse_args(argv)
    if shutil.which("sbatch") is None:
        sys.exit("no sbatch on PATH: start the local cluster with `make slurm-up`")
    seconds: dict[str, list[float]] = {k: [] for k in LAYOUTS}
    tokens: dict[str, list[float]] = {k: [] for k in LAYOUTS}
    with tempfile.TemporaryDirectory(prefix="bench-array-") as tmp:
        for r in range(args.repeats):
            order = list(LAYOUTS) if r % 2 == 0 else list(reversed(LAYOUTS))
            for layout in order:
                shards, cpus = LAYOUTS[layout]
                name = f"r{r}-{shards}x{cpus}"
                elapsed, tok_s = run_layout(Path(tmp), name, shards, cpus, args.problems, args.samples)
                seconds[layout].append(elapsed)
                tokens[layout].append(tok_s)
                print(f"round {r}: {layout}: {elapsed:.1f} s, {tok_s:.0f} tokens/s in the jobs", flush=True)
    records = args.problems * args.samples
    base = records / statistics.median(seconds["1 task x 1 CPU"])
    base_tok = statistics.median(tokens["1 task x 1 CPU"])
    print(f"\n{args.problems} problems x {args.samples} samples; median of {args.repeats} rounds")
    print("| layout | driver s | records/s | vs 1x1 | tokens/s in jobs | vs 1x1 |\n|---|---|---|---|---|---|")
    for layout, times in seconds.items():
        rate, tok = records / statistics.median(times), statistics.median(tokens[layout])
        print(f"| {layout} | {statistics.median(times):.1f} | {rate:.0f} | {rate / base:.2f}x | {tok:.0f} "
              f"| {tok / base_tok:.2f}x |")
    write_json(args.out, {"problems": args.problems, "samples": args.samples, "driver_seconds": seconds,
                          "job_tokens_per_s": tokens, "goal_2x1_vs_1x1": 1.7})
    return 0


if __name__ == "__main__":
    sys.exit(main())
