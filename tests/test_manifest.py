import json
import multiprocessing as mp
import os

from distill.manifest import Manifest, format_table

WRITERS, UPDATES = 8, 50


def _writer(run_dir: str, who: int, soft: bool) -> None:
    m = Manifest(run_dir, soft_lock=soft)
    for i in range(UPDATES):
        with m.update() as data:
            data["count"] = data.get("count", 0) + 1
            data.setdefault("log", []).append(f"{who}-{i}")


def _reader(run_dir: str, stop, bad) -> None:
    path = Manifest(run_dir).path
    while not stop.is_set():
        if path.exists():
            try:
                json.loads(path.read_text())
            except json.JSONDecodeError:
                bad.value += 1


def _hammer(tmp_path, soft: bool) -> None:
    ctx = mp.get_context("spawn")
    stop, bad = ctx.Event(), ctx.Value("i", 0)
    reader = ctx.Process(target=_reader, args=(str(tmp_path), stop, bad))
    reader.start()
    writers = [ctx.Process(target=_writer, args=(str(tmp_path), w, soft)) for w in range(WRITERS)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(120)
        assert p.exitcode == 0
    stop.set()
    reader.join(10)
    data = Manifest(tmp_path).read()
    assert data["count"] == WRITERS * UPDATES
    assert sorted(data["log"]) == sorted(f"{w}-{i}" for w in range(WRITERS) for i in range(UPDATES))
    assert bad.value == 0, "a reader saw a half-written manifest"
    assert not list(tmp_path.glob(".manifest.json.*.tmp")), "temp files left behind"


def test_concurrent_updates_lose_nothing_with_flock(tmp_path):
    _hammer(tmp_path, soft=False)


def test_concurrent_updates_lose_nothing_with_soft_lock(tmp_path):
    _hammer(tmp_path, soft=True)


def test_stage_and_shard_marks_and_table(tmp_path):
    m = Manifest(tmp_path)
    m.mark_shard(0, "generate", "0", "running", job_id="11_0")
    m.mark_shard(0, "generate", "0", "done", records=5)
    m.mark_shard(0, "generate", "1", "failed", error="boom")
    m.mark(0, "generate", "failed", error="shard 1 failed")
    m.mark(0, "generate", "done", num_shards=2, metrics={"records": 10})
    entry = m.stage(0, "generate")
    assert entry["state"] == "done" and entry["shards"]["0"]["records"] == 5
    assert entry["shards"]["0"]["attempts"] == 1 and entry["shards"]["1"]["state"] == "failed"
    assert "started" not in entry or entry["ended"] >= entry["started"]
    assert "error" not in entry, "a finished stage still shows an earlier failure"
    table = format_table(m.read())
    header, row = table.splitlines()
    assert header.split()[:4] == ["iter", "stage", "state", "shards"]
    assert row.split()[:4] == ["0", "generate", "done", "1/2"] and "records=10" in row


def test_a_unit_whose_process_is_gone_is_shown_interrupted_not_running(tmp_path):
    import socket
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    m = Manifest(tmp_path)
    here = socket.gethostname()
    m.mark(0, "train", "running", host=here, pid=dead)
    m.mark(0, "verify", "running", host=here, pid=os.getpid())  # this process: alive
    m.mark_shard(0, "generate", "0", "running", host=here, pid=dead)
    m.mark_shard(0, "generate", "1", "running", host="node-elsewhere", pid=dead)  # cannot be seen from here
    rows = {line.split()[1]: line.split()[2] for line in format_table(m.read()).splitlines()[1:]}
    assert rows == {"train": "interrupted", "verify": "running", "generate": "running"}
    assert m.stage(0, "train")["state"] == "running"  # shown, not rewritten
