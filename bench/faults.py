"""Fault injection: SIGKILL at random moments in every stage, a rerun, then the invariants.

A reference iteration 0 of a small copy of the demo config runs once, uninterrupted, with the
run directory saved before each stage. Each trial restores the run directory from before its
stage, starts the stage as a plain `python -m jobs.stage` process (what a SLURM task runs),
SIGKILLs its whole process group at a random moment, checks that the manifest still parses,
reruns the stage to completion and checks:

  - no record lost and none written twice (generation and evaluation shards);
  - the outputs equal the uninterrupted run's (shard records, merged generations, graded and
    verified files, the evaluated answers; training: the same final step and loss to 1e-6);
  - the manifest marks the unit done and every artifact it lists hashes to the file on disk.

Manifest trials kill a process in the middle of a stream of locked read-modify-write updates
and check that the file parses and holds a prefix of the updates, then finish the stream.

Corruption trials damage what a stage consumes (flipped bytes in the newest checkpoint or the
final model, an edited line of verified.jsonl): the consumer must refuse it (or, for a
checkpoint, set it aside and resume from the one before), and the reruns must end at the
uninterrupted run's outputs. A use of the damaged data is a "silent use". The second-driver
trial starts two drivers of one run half a second apart: one runs, the other refuses, and no
record is written twice.
Lost work is measured from what was on disk at the kill: the records the rerun generated beyond
those missing, and the training steps between the newest checkpoint and the end.

    .venv/bin/python bench/faults.py --trials 20 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.integrity import artifact  # noqa: E402
from distill.jsonl import iter_jsonl, sha256_file, write_json  # noqa: E402
from distill.layout import RunPaths  # noqa: E402
from distill.manifest import Manifest  # noqa: E402
from distill.training import newest_checkpoint  # noqa: E402
from jobs.signals import STOP_SIGNAL  # noqa: E402

# "requeue": training sent SLURM's stop signal (USR2) instead of SIGKILL, as before a time limit.
KINDS = ("generate", "verify", "train", "evaluate", "manifest", "requeue", "corrupt-checkpoint", "corrupt-model",
         "corrupt-jsonl", "second-driver")
MANIFEST_UPDATES = 2000
# Kill moments are drawn from [KILL_FROM, 1] x the unit's uninterrupted time: the first ~40% of
# a unit is interpreter start and model loading, and kills there leave nothing on disk.
KILL_FROM = 0.3
# Small enough that a trial takes seconds, large enough that a kill lands mid-work.
SETTINGS = {"data": {"train_limit": 480}, "generation": {"n": 2, "temperature": 0.7, "batch_size": 16, "num_shards": 2},
            "train": {"max_steps": 120, "save_steps": 10, "log_steps": 10},
            "eval": {"limit": 300, "batch_size": 25, "num_shards": 1}}


class Bench:
    """The work directory: the config, the run directory stages write to, and the snapshots."""

    def __init__(self, work: Path) -> None:
        self.work = work
        cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
        for section, values in SETTINGS.items():
            cfg[section].update(values)
        cfg.update(name="faults", run_root=str(work / "runs"))
        for section in ("models", "data"):
            cfg[section] = {k: str(ROOT / v) if isinstance(v, str) else v for k, v in cfg[section].items()}
        self.config = work / "faults.yaml"
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.run = work / "runs" / "faults"
        self.paths = RunPaths(self.run)
        self.durations: dict[str, float] = {}

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "jobs.stage", args[0], "--config", str(self.config), "--iter", "0", *args[1:]]

    def run_to_end(self, *args: str) -> dict[str, Any] | None:
        proc = subprocess.run(self.cmd(*args), cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        return json.loads(last) if last.startswith("{") else None

    def snapshot(self, name: str) -> None:
        dest = self.work / "snapshots" / name
        if self.run.exists():
            shutil.copytree(self.run, dest)
        else:
            dest.mkdir(parents=True)

    def restore(self, name: str) -> None:
        shutil.rmtree(self.run, ignore_errors=True)
        src = self.work / "snapshots" / name
        if any(src.iterdir()):
            shutil.copytree(src, self.run)

    def reference(self) -> None:
        """The uninterrupted iteration 0, timed per unit; its outputs are what every trial must reproduce."""
        steps: list[tuple[str, tuple[str, ...]]] = [
            ("generate", ("generate", "--shard", "0")), ("generate", ("generate", "--shard", "1")),
            ("", ("merge", "generate")), ("verify", ("verify",)), ("train", ("train",)),
            *[("evaluate", ("evaluate", "--shard", str(i))) for i in range(3)], ("", ("merge", "evaluate"))]
        for kind, args in steps:
            if kind and kind not in self.durations:
                self.snapshot(kind)
            start = time.perf_counter()
            self.run_to_end(*args)
            if kind:
                self.durations[kind] = max(self.durations.get(kind, 0.0), time.perf_counter() - start)
        shutil.copytree(self.run, self.work / "reference")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def ids(path: Path) -> list[str]:
    return [r["id"] for r in iter_jsonl(path, allow_partial_tail=True)] if path.exists() else []


def kill_at(cmd: list[str], delay: float, sig: signal.Signals = signal.SIGKILL) -> bool:
    """Start `cmd`, signal it after `delay` s (SIGKILL: its whole process group) and wait for it
    to end; False if it had finished by then."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        proc.wait()
        return True


def kill_when(cmd: list[str], ready: Any, timeout: float = 600) -> bool:
    """Start `cmd` and SIGKILL its process group as soon as `ready()` holds; False if it had
    ended by then."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    proc.wait()
    return False


def checkpoint_step(ckpt_dir: Path) -> int:
    ckpt = newest_checkpoint(ckpt_dir)
    return int(ckpt.name.split("-")[1]) if ckpt else 0


def check_artifacts(run: Path) -> list[str]:
    """Problems with the manifest: every artifact it lists exists and hashes as recorded."""
    problems = []
    for it in Manifest(run).read().get("iterations", {}).values():
        for stage, entry in it.get("stages", {}).items():
            for name, art in entry.get("artifacts", {}).items():
                path = run / art["path"]
                if not path.exists():
                    problems.append(f"{stage}.{name}: {path} missing")
                elif artifact(path, run)["sha256"] != art["sha256"]:
                    problems.append(f"{stage}.{name}: {path} does not hash as the manifest says")
    return problems


def trial(bench: Bench, kind: str, rng: random.Random) -> dict[str, Any]:
    if kind == "manifest":
        return manifest_trial(bench, rng)
    if kind.startswith("corrupt-"):
        return corruption_trial(bench, kind, rng)
    if kind == "second-driver":
        return second_driver_trial(bench)
    sig = signal.SIGKILL
    if kind == "requeue":
        kind, sig = "train", STOP_SIGNAL
    bench.restore(kind)
    ref, run, paths = bench.work / "reference", bench.run, bench.paths
    args: tuple[str, ...] = (kind,)
    unit = None  # the manifest's shard key, for sharded stages
    if kind == "generate":
        shard = rng.randrange(2)
        args = ("generate", "--shard", str(shard))
        out, unit = paths.gen_shard(0, shard, 2), str(shard)
    elif kind == "evaluate":
        task = rng.randrange(3)
        args = ("evaluate", "--shard", str(task))
        label = ("teacher", "base", "student")[task]
        out, unit = paths.eval(0, 1).shard(label, 0), f"{label}:0"
    delay = rng.uniform(KILL_FROM, 1.0) * bench.durations[kind]
    killed = kill_at(bench.cmd(*args), delay, sig)
    name = " ".join(args) + (f" ({sig.name})" if sig != signal.SIGKILL else "")
    row: dict[str, Any] = {"kind": name, "kill_s": round(delay, 2), "killed": killed, "problems": []}
    try:
        Manifest(run).read()
    except Exception as exc:  # noqa: BLE001 (any failure to parse is the finding)
        row["problems"].append(f"manifest unreadable after the kill: {exc}")
    if kind in ("generate", "evaluate"):
        on_disk = len(ids(out))
        row["on_disk"] = on_disk
        result = bench.run_to_end(*args)
        total = len(lines(ref / out.relative_to(run)))
        if result is not None:  # None: the killed run had finished the unit
            row["redone"] = result["generated_records"] - (total - on_disk)
        got = ids(out)
        if len(got) != len(set(got)):
            row["problems"].append(f"{len(got) - len(set(got))} duplicate records in {out.name}")
        compare = [out] + ([paths.eval(0, 1).graded_shard(label, 0)] if kind == "evaluate" else [])
        if kind == "generate":
            bench.run_to_end("generate", "--shard", str(1 - shard))
            bench.run_to_end("merge", "generate")
            compare.append(paths.generations(0))
    elif kind == "train":
        ckpt = newest_checkpoint(paths.train(0).checkpoints)
        row["on_disk"] = json.loads((ckpt / "state.json").read_text())["step"] if ckpt else 0
        rerun = bench.run_to_end("train")
        ref_entry = Manifest(ref).stage(0, "train")["metrics"]
        stage_entry = Manifest(run).stage(0, "train")
        entry = stage_entry["metrics"]
        if rerun is not None:  # None: the first run had finished
            steps_after = entry["step"] - stage_entry.get("resumed_from", 0)
            row["redone"] = steps_after - (ref_entry["step"] - row["on_disk"])
        if entry["step"] != ref_entry["step"] or abs(entry["loss"] - ref_entry["loss"]) > 1e-6:
            row["problems"].append(f"final step/loss {entry['step']}/{entry['loss']} vs {ref_entry['step']}/{ref_entry['loss']}")
        row["loss_diff"] = abs(entry["loss"] - ref_entry["loss"])
        weights = paths.student(0) / "model.safetensors"
        row["same_weights"] = sha256_file(weights) == sha256_file(ref / weights.relative_to(run))
        compare = []
    else:  # verify
        bench.run_to_end("verify")
        compare = [paths.graded(0), paths.verified(0), paths.unsolved(0)]
    allowed = SETTINGS["generation"]["n"] - 1 if kind == "generate" else 0  # samples of a half-written problem
    if row.get("redone", 0) > allowed:
        row["problems"].append(f"{row['redone']} records/steps that were on disk were done again")
    for path in compare:
        if lines(path) != lines(ref / path.relative_to(run)):
            row["problems"].append(f"{path.relative_to(run)} differs from the uninterrupted run")
    entry = Manifest(run).stage(0, kind)
    state = entry["shards"][unit]["state"] if unit else entry.get("state")
    if state != "done":
        row["problems"].append(f"manifest: {kind} {unit or ''} is {state!r}, not done")
    row["problems"] += check_artifacts(run)
    return row


def flip(path: Path, rng: random.Random, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    start = rng.randrange(len(data) // 4, len(data) - n)
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def attempt(bench: Bench, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(bench.cmd(*args), cwd=ROOT, capture_output=True, text=True, check=False)


def corruption_trial(bench: Bench, kind: str, rng: random.Random) -> dict[str, Any]:
    """Damage one input of a stage; the stage must not use it, and the reruns must end at the
    uninterrupted run's outputs."""
    ref, run, paths = bench.work / "reference", bench.run, bench.paths
    row: dict[str, Any] = {"kind": kind, "kill_s": 0.0, "killed": False, "problems": [], "silent": 0}
    if kind == "corrupt-checkpoint":
        bench.restore("train")
        t = SETTINGS["train"]
        target = t["save_steps"] * rng.randrange(2, t["max_steps"] // t["save_steps"])
        start = time.perf_counter()
        row["killed"] = kill_when(bench.cmd("train"), lambda: checkpoint_step(paths.train(0).checkpoints) >= target)
        row["kill_s"] = round(time.perf_counter() - start, 2)
        ckpt = newest_checkpoint(paths.train(0).checkpoints)
        if ckpt is None or not row["killed"]:
            row["problems"].append("no checkpoint to damage (training ended first)")
            return row
        damaged = json.loads((ckpt / "state.json").read_text())["step"]
        row["on_disk"] = damaged
        flip(ckpt / "weights.safetensors", rng)
        bench.run_to_end("train")
        entry = Manifest(run).stage(0, "train")
        row["silent"] = int(entry.get("resumed_from", 0) >= damaged)
        ref_entry = Manifest(ref).stage(0, "train")["metrics"]
        if abs(entry["metrics"]["loss"] - ref_entry["loss"]) > 1e-6:
            row["problems"].append(f"final loss {entry['metrics']['loss']} vs {ref_entry['loss']}")
        compare = [paths.student(0) / "model.safetensors"]
    elif kind == "corrupt-model":
        bench.restore("evaluate")
        flip(paths.student(0) / "model.safetensors", rng)
        refused = attempt(bench, "evaluate", "--shard", "2")  # the student's evaluation task
        row["silent"] = int(refused.returncode == 0)
        if "model" not in refused.stderr or "changed since train of iteration 0" not in refused.stderr:
            row["problems"].append(f"refusal does not name the model: {refused.stderr.strip()[-300:]}")
        for args in (("train",), *[("evaluate", "--shard", str(i)) for i in range(3)], ("merge", "evaluate")):
            bench.run_to_end(*args)
        compare = [paths.student(0) / "model.safetensors", paths.eval(0, 1).graded("student")]
    else:  # corrupt-jsonl
        bench.restore("train")
        rows = paths.verified(0).read_text().splitlines(keepends=True)
        i = rng.randrange(len(rows))
        record = json.loads(rows[i])
        record["response"] = record["response"][::-1]
        rows[i] = json.dumps(record) + "\n"
        paths.verified(0).write_text("".join(rows))
        refused = attempt(bench, "train")
        row["silent"] = int(refused.returncode == 0 or paths.train(0).checkpoints.exists())
        if "verified.jsonl: changed since verify of iteration 0" not in refused.stderr:
            row["problems"].append(f"refusal does not name the file: {refused.stderr.strip()[-300:]}")
        bench.run_to_end("verify")
        bench.run_to_end("train")
        compare = [paths.verified(0), paths.student(0) / "model.safetensors"]
    for path in compare:
        if path.read_bytes() != (ref / path.relative_to(run)).read_bytes():
            row["problems"].append(f"{path.relative_to(run)} differs from the uninterrupted run")
    if row["silent"]:
        row["problems"].append("the damaged data was used")
    row["problems"] += check_artifacts(run)
    return row


def second_driver_trial(bench: Bench) -> dict[str, Any]:
    """Two drivers of one run, 0.5 s apart: one generates, the other refuses; nothing twice."""
    bench.restore("generate")
    cmd = [sys.executable, "-m", "jobs.driver", "--config", str(bench.config), "--executor", "local",
           "--stages", "generate"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    out, err = first.communicate()
    row: dict[str, Any] = {"kind": "second-driver", "kill_s": 0.0, "killed": False, "problems": [], "silent": 0}
    if first.returncode != 0:
        row["problems"].append(f"the first driver failed: {err.strip()[-300:]}")
    if second.returncode != 2 or "another driver works on this run" not in second.stderr:
        row["problems"].append(f"the second driver did not refuse: exit {second.returncode} {second.stderr.strip()[-300:]}")
    row["silent"] = int("submitted" in second.stdout)
    row["on_disk"] = sum(1 for line in out.splitlines() if "submitted" in line)
    for shard in range(2):
        got = ids(bench.paths.gen_shard(0, shard, 2))
        if len(got) != len(set(got)):
            row["problems"].append(f"shard {shard}: {len(got) - len(set(got))} duplicate records")
    bench.run_to_end("merge", "generate")
    if lines(bench.paths.generations(0)) != lines(bench.work / "reference" / bench.paths.generations(0).relative_to(bench.run)):
        row["problems"].append("generations.jsonl differs from the uninterrupted run")
    return row


MANIFEST_WRITER = """
import sys
from distill.manifest import Manifest
m, start = Manifest(sys.argv[1]), int(sys.argv[2])
for i in range(start, {n}):
    m.mark_shard(0, "faults", str(i % 8), "done", seq=i)
    m.set_meta(counter=i)
"""


def manifest_trial(bench: Bench, rng: random.Random) -> dict[str, Any]:
    """Kill a process mid-stream of manifest updates; the file must parse and hold a prefix."""
    run = bench.work / "manifest-trial"
    shutil.rmtree(run, ignore_errors=True)
    code = MANIFEST_WRITER.format(n=MANIFEST_UPDATES)
    delay = rng.uniform(KILL_FROM, 1.0) * bench.durations["manifest"]
    killed = kill_at([sys.executable, "-c", code, str(run), "0"], delay)
    row: dict[str, Any] = {"kind": "manifest", "kill_s": round(delay, 2), "killed": killed, "problems": []}
    try:
        data = Manifest(run).read()
    except Exception as exc:  # noqa: BLE001
        row["problems"].append(f"manifest unreadable after the kill: {exc}")
        data = {}
    # The writer marks update i, then sets the counter to i: the newest update on disk is the
    # counter or the one after it; every shard must hold its newest update up to there.
    counter = data.get("counter", -1)
    shards = data.get("iterations", {}).get("0", {}).get("stages", {}).get("faults", {}).get("shards", {})
    after = shards.get(str((counter + 1) % 8), {}).get("seq") == counter + 1
    last = counter + 1 if after else counter
    row["on_disk"] = last + 1
    want = {str(s): max(i for i in range(last + 1) if i % 8 == s) for s in range(min(last + 1, 8))}
    if {s: e["seq"] for s, e in shards.items()} != want:
        row["problems"].append(f"after update {last}: shards hold {shards}, expected the newest of each {want}")
    subprocess.run([sys.executable, "-c", code, str(run), str(last + 1)], cwd=ROOT, check=True)
    final = Manifest(run).read()
    if final["counter"] != MANIFEST_UPDATES - 1 or any(
        e["seq"] != max(i for i in range(MANIFEST_UPDATES) if i % 8 == int(s))
        for s, e in final["iterations"]["0"]["stages"]["faults"]["shards"].items()
    ):
        row["problems"].append("the finished stream does not hold the last update of every shard")
    return row


def time_manifest_stream(bench: Bench) -> None:
    run = bench.work / "manifest-trial"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", MANIFEST_WRITER.format(n=MANIFEST_UPDATES), str(run), "0"], cwd=ROOT, check=True)
    bench.durations["manifest"] = time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help=f"kills in all, spread over {', '.join(KINDS)} (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random kill moments (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "faults.json", help="JSON results (default: %(default)s)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="trial kinds, comma-separated (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        parser.error(f"--kinds: choose from {', '.join(KINDS)}")
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="distill-faults-"))
    try:
        bench = Bench(work)
        start = time.perf_counter()
        bench.reference()
        time_manifest_stream(bench)
        print("reference run: " + ", ".join(f"{k} {v:.1f} s" for k, v in bench.durations.items()), flush=True)
        rows = []
        for t in range(args.trials):
            row = trial(bench, kinds[t % len(kinds)], rng)
            rows.append(row)
            verdict = "ok" if not row["problems"] else "FAILED: " + "; ".join(row["problems"])
            print(f"trial {t:2d} {row['kind']:<20} kill at {row['kill_s']:5.2f} s  on disk {row.get('on_disk', '-')!s:>4}"
                  f"  redone {row.get('redone', '-')!s:>3}  {verdict}", flush=True)
        failed = [r for r in rows if r["problems"]]
        print(f"\n{len(rows)} trials in {time.perf_counter() - start:.0f} s, {sum(r['killed'] for r in rows)} killed mid-run, "
              f"{len(failed)} failed")
        g, t = SETTINGS["generation"], SETTINGS["train"]
        in_flight = {"generate": f"{g['batch_size'] * g['n']} records (a batch)", "verify": "the stage (one pass)",
                     "train": f"{t['save_steps'] - 1} steps (save_steps - 1)", "evaluate": f"{SETTINGS['eval']['batch_size']} records (a batch)",
                     "manifest": "1 update", "requeue": "0 steps (saved at the stop)",
                     "corrupt-checkpoint": f"{t['save_steps']} steps (one checkpoint)", "corrupt-model": "0 (saved again)",
                     "corrupt-jsonl": "0 (verify again)", "second-driver": "0"}
        print("| trial | trials | killed mid-run | failed | on disk at the kill (records / checkpoint step / updates) "
              "| done again although on disk | lost in flight, at most | silent uses of bad data |")
        print("|---|---|---|---|---|---|---|---|")
        for kind in KINDS:
            mine = [r for r in rows if (r["kind"].split()[0] if "(" not in r["kind"] else "requeue") == kind]
            if mine:
                on_disk = ", ".join(str(r.get("on_disk", "-")) for r in mine)
                redone = ", ".join(str(r["redone"]) for r in mine if "redone" in r) or "-"
                silent = sum(r["silent"] for r in mine) if "silent" in mine[0] else "-"
                print(f"| {kind} | {len(mine)} | {sum(r['killed'] for r in mine)} | {sum(bool(r['problems']) for r in mine)} "
                      f"| {on_disk} | {redone} | {in_flight[kind]} | {silent} |")
        write_json(args.out, {"settings": SETTINGS, "durations": bench.durations, "trials": rows})
        return 1 if failed else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
