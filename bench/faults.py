"""Fault injection: SIGKILL at random moments in every stage, a rerun, then the invariants.

A reference iteration 0 of a small copy of the demo config runs once, uninterrupted, with the
run directory saved before each stage. Each trial restores the run directory from before its
stage, starts the stage as a plain `python -m jobs.sbatch` process (what a SLURM task runs),
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

Attack trials break the promises of resuming from outside a stage (the bench works on its own
copies of the data files, so it may edit them):

  - data-edit: a gold answer of the test split changed, or the training file cut in half,
    before verify: `jobs.sbatch verify` and the driver refuse with exit 2 naming the change, and
    run nothing; with the file restored, verify runs to the reference's outputs;
  - lease-takeover: driver A is stopped (SIGSTOP) once its generate jobs have claimed their
    shards, its lease aged an hour; driver B under another host name (`unshare -u`) takes the
    lease over, waits for A's jobs and submits nothing; A, continued, exits 2 ("lease was taken
    over") and writes nothing more; no record twice, the reference's generations (skipped where
    `unshare -u` is not permitted);
  - nan-model-repair: one element of every tensor of the final model set to NaN, the manifest
    deleted: `distill repair` must not record training done, and the next train run saves the
    model again from its sealed checkpoint, finite and equal to the reference's;
  - shard-lost-line: a finished generation shard loses its last line and the merged generations
    are deleted; the driver (generate,verify), rerun as a user would, ends in exit 0 within two
    runs with every record once and the reference's outputs.

A "silent use" is a use of bad data or work written twice that nothing refused.
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

from distill.integrity import artifact, content_hash, source_file  # noqa: E402
from distill.jsonl import iter_jsonl, sha256_file, write_json  # noqa: E402
from distill.layout import RunPaths  # noqa: E402
from distill.manifest import Manifest  # noqa: E402
from distill.training import newest_checkpoint  # noqa: E402
from jobs.signals import STOP_SIGNAL  # noqa: E402

# "requeue": training sent SLURM's stop signal (USR2) instead of SIGKILL, as before a time limit.
KINDS = ("generate", "verify", "train", "evaluate", "manifest", "requeue", "corrupt-checkpoint", "corrupt-model",
         "corrupt-jsonl", "second-driver", "data-edit", "lease-takeover", "nan-model-repair", "shard-lost-line")
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
        cfg["models"] = {k: str(ROOT / v) if isinstance(v, str) else v for k, v in cfg["models"].items()}
        # The bench's own copies of the data files, so that trials may edit them.
        self.data = work / "data"
        self.data.mkdir(parents=True)
        for key, value in cfg["data"].items():
            if isinstance(value, str) and (ROOT / value).is_file():
                cfg["data"][key] = str(shutil.copy2(ROOT / value, self.data / Path(value).name))
            elif isinstance(value, str):
                cfg["data"][key] = str(ROOT / value)
        self.config = work / "faults.yaml"
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.run = work / "runs" / "faults"
        self.paths = RunPaths(self.run)
        self.durations: dict[str, float] = {}
        self.nan_trials = 0

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "jobs.sbatch", args[0], "--config", str(self.config), "--iter", "0", *args[1:]]

    def driver(self, stages: str) -> list[str]:
        return [sys.executable, "-m", "jobs.driver", "--config", str(self.config), "--executor", "local",
                "--progress-every", "3600", "--stages", stages]

    def split(self, name: str) -> Path:
        return Path(yaml.safe_load(self.config.read_text())["data"][name])

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
    if kind == "data-edit":
        return data_edit_trial(bench, rng)
    if kind == "lease-takeover":
        return lease_takeover_trial(bench)
    if kind == "nan-model-repair":
        return nan_model_repair_trial(bench)
    if kind == "shard-lost-line":
        return shard_lost_line_trial(bench, rng)
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
            row["problems"].append(f"final step/loss {entry['step']}/{entry['loss']} "
                                   f"vs {ref_entry['step']}/{ref_entry['loss']}")
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
        row["problems"].append(f"the second driver did not refuse: exit {second.returncode} "
                               f"{second.stderr.strip()[-300:]}")
    row["silent"] = int("submitted" in second.stdout)
    row["on_disk"] = sum(1 for line in out.splitlines() if "submitted" in line)
    for shard in range(2):
        got = ids(bench.paths.gen_shard(0, shard, 2))
        if len(got) != len(set(got)):
            row["problems"].append(f"shard {shard}: {len(got) - len(set(got))} duplicate records")
    bench.run_to_end("merge", "generate")
    reference = bench.work / "reference" / bench.paths.generations(0).relative_to(bench.run)
    if lines(bench.paths.generations(0)) != lines(reference):
        row["problems"].append("generations.jsonl differs from the uninterrupted run")
    return row


def same_outputs(bench: Bench, paths: list[Path], row: dict[str, Any]) -> None:
    ref, run = bench.work / "reference", bench.run
    for path in paths:
        if lines(path) != lines(ref / path.relative_to(run)):
            row["problems"].append(f"{path.relative_to(run)} differs from the uninterrupted run")


def data_edit_trial(bench: Bench, rng: random.Random) -> dict[str, Any]:
    """A data file edited between stages (a gold answer of the test split changed, or the
    training file cut in half): the unit started by hand and the driver both refuse, naming
    the change, and run nothing; with the file restored, the stage runs to the reference's
    outputs."""
    bench.restore("verify")
    paths = bench.paths
    split = rng.choice(("test", "train"))
    path = bench.split(split)
    original = path.read_bytes()
    rows = original.decode().splitlines(keepends=True)
    if split == "test":
        i = rng.randrange(len(rows))
        record = json.loads(rows[i])
        old = record["answer"]
        record["answer"] = str(int(old) + 1)
        record["solution"] = record["solution"].replace(f"\\boxed{{{old}}}", f"\\boxed{{{record['answer']}}}")
        rows[i] = json.dumps(record) + "\n"
        edit = f"test gold {i}"
    else:
        rows = rows[: len(rows) // 2]
        edit = f"train cut to {len(rows)}"
    path.write_text("".join(rows))
    row: dict[str, Any] = {"kind": "data-edit", "kill_s": 0.0, "killed": False, "problems": [], "silent": 0,
                           "on_disk": edit}
    before = Manifest(bench.run).read()
    try:
        for name, cmd in (("jobs.sbatch verify", bench.cmd("verify")), ("the driver", bench.driver("verify"))):
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
            if proc.returncode == 0:
                row["silent"] = 1
            if proc.returncode != 2 or f"data.{split} changed since" not in proc.stderr:
                row["problems"].append(f"{name} did not refuse the edited {path.name}: exit {proc.returncode} "
                                       f"{proc.stderr.strip()[-300:]}")
        after = Manifest(bench.run).read()
        if paths.graded(0).exists() or "verify" in after.get("iterations", {}).get("0", {}).get("stages", {}):
            row["silent"] = 1
        if after.get("data") != before.get("data") or "history" in after:
            row["problems"].append("the refused commands changed the run's recorded data hashes or history")
    finally:
        path.write_bytes(original)
    bench.run_to_end("verify")
    same_outputs(bench, [paths.graded(0), paths.verified(0), paths.unsolved(0)], row)
    if Manifest(bench.run).stage(0, "verify").get("state") != "done":
        row["problems"].append("verify is not done once the file was restored")
    if row["silent"]:
        row["problems"].append("a stage ran on the edited data")
    row["problems"] += check_artifacts(bench.run)
    return row


def unshare_refusal() -> str | None:
    """Why a process cannot be started under another host name (`unshare -u`), or None."""
    try:
        proc = subprocess.run(["unshare", "-u", "sh", "-c", "hostname login-2"], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -u: {exc}"
    return None if proc.returncode == 0 else f"unshare -u not permitted: {proc.stderr.strip()[-200:]}"


def wait_until(ready: Any, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Poll `ready()` until it holds (True), or `proc` ends or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return True
        time.sleep(0.05)
    return False


def lease_takeover_trial(bench: Bench) -> dict[str, Any]:
    """Driver A is stopped (SIGSTOP) once each of its generate jobs has claimed its shard, and its
    lease's heartbeat is aged an hour; driver B, on another host name, takes the lease over and
    must wait for A's jobs instead of submitting them again; A, continued, must stop without
    writing anything."""
    row: dict[str, Any] = {"kind": "lease-takeover", "kill_s": 0.0, "killed": False, "problems": [], "silent": 0}
    why = unshare_refusal()
    if why is not None:
        row["skipped"] = why
        return row
    bench.restore("generate")
    run, paths = bench.run, bench.paths
    cmd = bench.driver("generate")
    a_log = bench.work / "driver-a.log"
    with a_log.open("w") as log:
        first = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)

    def submitted_and_running() -> bool:
        if "submitted" not in a_log.read_text():
            return False
        states = [Manifest(run).stage(0, "generate").get("shards", {}).get(str(k), {}).get("state") for k in range(2)]
        return "running" in states and set(states) <= {"running", "done"}

    start = time.perf_counter()
    second = None
    try:
        if not wait_until(submitted_and_running, first):
            row["problems"].append(f"driver A ended before its jobs were seen running: {a_log.read_text()[-300:]}")
            return row
        os.kill(first.pid, signal.SIGSTOP)
        row["kill_s"] = round(time.perf_counter() - start, 2)
        lease = run / "driver.lease"
        lease.write_text(json.dumps({**json.loads(lease.read_text()), "heartbeat": time.time() - 3600}) + "\n")
        second = subprocess.run(["unshare", "-u", "sh", "-c", 'hostname login-2 && exec "$@"', "sh", *cmd], cwd=ROOT,
                                capture_output=True, text=True, timeout=600, check=False)
        manifest_after_b = paths.manifest.read_bytes() if paths.manifest.exists() else b""
    finally:
        os.kill(first.pid, signal.SIGCONT)
        try:
            first.wait(timeout=600)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait()
    a_out = a_log.read_text()
    b_out = second.stdout
    row["on_disk"] = ("B waited" if "waiting for" in b_out and "another process runs" in b_out
                      else "A's jobs ended first")
    if second.returncode != 0:
        row["problems"].append(f"driver B failed: exit {second.returncode} {(second.stderr or b_out).strip()[-300:]}")
    if "submitted" in b_out:
        row["problems"].append("driver B submitted jobs for units A's jobs ran: "
                               + next(line for line in b_out.splitlines() if "submitted" in line).strip())
    if first.returncode != 2 or "lease was taken over" not in a_out:
        row["problems"].append(f"driver A did not stop on the lost lease: exit {first.returncode} "
                               f"{a_out.strip()[-300:]}")
    wrote = "merged" in a_out or paths.manifest.read_bytes() != manifest_after_b
    row["silent"] = int(wrote)
    if wrote:
        row["problems"].append("driver A wrote to the run after losing its lease")
    for shard in range(2):
        got = ids(paths.gen_shard(0, shard, 2))
        if len(got) != len(set(got)):
            row["silent"] += len(got) - len(set(got))
            row["problems"].append(f"shard {shard}: {len(got) - len(set(got))} duplicate records")
    same_outputs(bench, [paths.gen_shard(0, s, 2) for s in range(2)] + [paths.generations(0)], row)
    if Manifest(run).stage(0, "generate").get("state") != "done":
        row["problems"].append("generate is not done after driver B")
    row["problems"] += check_artifacts(run)
    return row


def poison(model: Path) -> int:
    """Set the first element of every floating-point tensor of a safetensors file to NaN; how
    many tensors."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(model), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(model))
    n = 0
    for tensor in tensors.values():
        if tensor.is_floating_point() and tensor.numel():
            tensor.view(-1)[0] = float("nan")
            n += 1
    save_file(tensors, str(model), metadata=metadata)
    return n if all(torch.isnan(t.view(-1)[0]) for t in tensors.values() if t.is_floating_point()) else -1


def nonfinite(model: Path) -> list[str]:
    """The tensors of a safetensors file that hold an inf or NaN."""
    import torch
    from safetensors.torch import load_file

    return [name for name, t in load_file(str(model)).items() if t.is_floating_point() and not torch.isfinite(t).all()]


def nan_model_repair_trial(bench: Bench) -> dict[str, Any]:
    """The final model's weights turned NaN (one element of every tensor) and the manifest lost:
    `distill repair` must not record training done; the next train run saves the model again
    from its sealed checkpoint, finite and equal to the reference model. In every other trial (the
    first, the third, ...) the model's record (`model.source.json`) is rewritten to the NaN model's
    hash, as if it had been saved so: then only the finiteness check stands between it and "done"."""
    bench.restore("evaluate")
    run, paths = bench.run, bench.paths
    model = paths.student(0) / "model.safetensors"
    row: dict[str, Any] = {"kind": "nan-model-repair", "kill_s": 0.0, "killed": False, "problems": [], "silent": 0}
    n = poison(model)
    record = source_file(paths.student(0))
    bench.nan_trials += 1
    resealed = bench.nan_trials % 2 == 1 and record.exists()
    if resealed:
        record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": content_hash(paths.student(0))},
                                     indent=1) + "\n")
    row["on_disk"] = f"{n} NaN tensors{' + record resealed' if resealed else ''}"
    paths.manifest.unlink()
    repair = subprocess.run([sys.executable, "-m", "distill", "repair", "--run", str(run)], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    if repair.returncode != 0:
        row["problems"].append(f"repair failed: exit {repair.returncode} {repair.stderr.strip()[-300:]}")
    state = Manifest(run).stage(0, "train").get("state")
    row["silent"] = int(state == "done")
    if row["silent"]:
        row["problems"].append("repair recorded training done with a NaN model")
    for stage in ("generate", "verify"):
        if Manifest(run).stage(0, stage).get("state") != "done":
            row["problems"].append(f"repair did not recover {stage}")
    rerun = attempt(bench, "train")
    if rerun.returncode != 0:
        row["problems"].append(f"train after repair failed: exit {rerun.returncode} {rerun.stderr.strip()[-300:]}")
    else:
        bad = nonfinite(model)
        if bad:
            row["problems"].append(f"the saved model is not finite again: {', '.join(bad[:3])}")
        if model.read_bytes() != (bench.work / "reference" / model.relative_to(run)).read_bytes():
            row["problems"].append(f"{model.relative_to(run)} differs from the uninterrupted run")
        if Manifest(run).stage(0, "train").get("state") != "done":
            row["problems"].append("train is not done after its rerun")
    row["problems"] += check_artifacts(run)
    return row


def shard_lost_line_trial(bench: Bench, rng: random.Random) -> dict[str, Any]:
    """A finished generation shard loses its last line and the merged generations are deleted;
    the driver (`--stages generate,verify`), rerun as a user would, must finish within two runs
    with every record once and the reference's outputs."""
    bench.restore("verify")
    paths = bench.paths
    shard = rng.randrange(2)
    path = paths.gen_shard(0, shard, 2)
    rows = path.read_text().splitlines(keepends=True)
    path.write_text("".join(rows[:-1]))
    paths.generations(0).unlink()
    row: dict[str, Any] = {"kind": "shard-lost-line", "kill_s": 0.0, "killed": False, "problems": [], "silent": 0,
                           "on_disk": len(rows) - 1}
    runs = []
    for _ in range(3):
        proc = subprocess.run(bench.driver("generate,verify"), cwd=ROOT, capture_output=True, text=True, check=False)
        runs.append(proc)
        if proc.returncode == 0:
            break
    row["runs"] = len(runs)
    if runs[-1].returncode != 0 or len(runs) > 2:
        row["problems"].append(f"the driver took {len(runs)} run(s), the last exit {runs[-1].returncode}: "
                               f"{runs[-1].stderr.strip()[-300:]}")
    entry = Manifest(bench.run).stage(0, "generate").get("shards", {}).get(str(shard), {})
    if "generated_records" in entry:
        row["redone"] = entry["generated_records"] - 1
        if row["redone"] > SETTINGS["generation"]["n"] - 1:
            row["problems"].append(f"{row['redone']} records that were on disk were generated again")
    got = ids(path)
    row["silent"] = len(got) - len(set(got))
    if row["silent"]:
        row["problems"].append(f"shard {shard}: {row['silent']} duplicate records")
    if sorted(got) != sorted(ids(bench.work / "reference" / path.relative_to(bench.run))):
        row["problems"].append(f"shard {shard} does not hold the reference's records")
    same_outputs(bench, [paths.generations(0), paths.graded(0), paths.verified(0), paths.unsolved(0)], row)
    for stage in ("generate", "verify"):
        if Manifest(bench.run).stage(0, stage).get("state") != "done":
            row["problems"].append(f"{stage} is not done")
    row["problems"] += check_artifacts(bench.run)
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
    subprocess.run([sys.executable, "-c", MANIFEST_WRITER.format(n=MANIFEST_UPDATES), str(run), "0"],
                   cwd=ROOT, check=True)
    bench.durations["manifest"] = time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20,
                        help=f"kills in all, spread over {', '.join(KINDS)} (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random kill moments (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "faults.json",
                        help="JSON results (default: %(default)s)")
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
            began = time.perf_counter()
            row = trial(bench, kinds[t % len(kinds)], rng)
            row["seconds"] = round(time.perf_counter() - began, 1)
            rows.append(row)
            verdict = ("ok" if not row["problems"] else "FAILED: " + "; ".join(row["problems"])) \
                if "skipped" not in row else f"skipped: {row['skipped']}"
            print(f"trial {t:2d} {row['kind']:<20} kill at {row['kill_s']:5.2f} s  "
                  f"on disk {row.get('on_disk', '-')!s:>4}"
                  f"  redone {row.get('redone', '-')!s:>3}  {verdict}", flush=True)
        failed = [r for r in rows if r["problems"]]
        skipped = sum("skipped" in r for r in rows)
        print(f"\n{len(rows)} trials in {time.perf_counter() - start:.0f} s, "
              f"{sum(r['killed'] for r in rows)} killed mid-run, "
              f"{len(failed)} failed, {sum(r.get('silent', 0) for r in rows)} silent uses of bad data"
              + (f", {skipped} skipped" if skipped else ""))
        g, t = SETTINGS["generation"], SETTINGS["train"]
        in_flight = {"generate": f"{g['batch_size'] * g['n']} records (a batch)", "verify": "the stage (one pass)",
                     "train": f"{t['save_steps'] - 1} steps (save_steps - 1)",
                     "evaluate": f"{SETTINGS['eval']['batch_size']} records (a batch)",
                     "manifest": "1 update", "requeue": "0 steps (saved at the stop)",
                     "corrupt-checkpoint": f"{t['save_steps']} steps (one checkpoint)",
                     "corrupt-model": "0 (saved again)",
                     "corrupt-jsonl": "0 (verify again)", "second-driver": "0",
                     "data-edit": "0 (refused before running)",
                     "lease-takeover": "0 (B waits for A's jobs)",
                     "nan-model-repair": "0 (saved again from the last checkpoint)",
                     "shard-lost-line": f"the lost line (+ at most {g['n'] - 1} samples of its problem)"}
        print("| trial | trials | killed mid-run | failed | on disk at the kill (records / checkpoint step / updates) "
              "| done again although on disk | lost in flight, at most | silent uses of bad data |")
        print("|---|---|---|---|---|---|---|---|")
        for kind in KINDS:
            mine = [r for r in rows if (r["kind"].split()[0] if "(" not in r["kind"] else "requeue") == kind]
            if mine and all("skipped" in r for r in mine):
                print(f"| {kind} | {len(mine)} | - | skipped: {mine[0]['skipped']} | - | - | {in_flight[kind]} | - |")
            elif mine:
                mine = [r for r in mine if "skipped" not in r]
                on_disk = ", ".join(str(r.get("on_disk", "-")) for r in mine)
                redone = ", ".join(str(r["redone"]) for r in mine if "redone" in r) or "-"
                silent = sum(r["silent"] for r in mine) if "silent" in mine[0] else "-"
                print(f"| {kind} | {len(mine)} | {sum(r['killed'] for r in mine)} "
                      f"| {sum(bool(r['problems']) for r in mine)} "
                      f"| {on_disk} | {redone} | {in_flight[kind]} | {silent} |")
        write_json(args.out, {"settings": SETTINGS, "durations": bench.durations, "trials": rows})
        return 1 if failed else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
