"""Training as two ranks under torchrun (gloo, CPU): the steps of one process at the same global
batch, checkpoints that survive a kill, a stop asked of one rank that stops both.

Every run is a real torchrun (`python -m torch.distributed.run`, the script behind `torchrun`)
of tests/dist_train.py. The batch settings leave the last micro-batch of the first epoch with one
example (31 examples, batch_size 5), so a rank runs without examples of its own there.
`pytest tests/test_distributed.py -rP` shows the measured differences.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.config import check_train, load_config
from distill.errors import ConfigError, DistillError
from distill.ranks import Ranks, join
from distill.train_config import LoraConfig, TrainConfig
from distill.training import newest_checkpoint
from tests.conftest import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
SHORT = {"lr": 0.01, "max_steps": 6, "batch_size": 5, "grad_accum": 2, "save_steps": 100, "log_steps": 1,
         "max_length": 64}
LONG = {**SHORT, "max_steps": 12, "save_steps": 4}


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def command(spec: dict, nproc: int) -> list[str]:
    """One process (nproc 0), or torchrun with `nproc` ranks on a free port."""
    module = ["-m", "tests.dist_train", json.dumps(spec)]
    if nproc == 0:
        return [sys.executable, *module]
    return [*TORCHRUN, "--nnodes", "1", "--nproc_per_node", str(nproc), "--standalone", *module]


def spec(world, out: Path, distributed: str, objective: str = "sft", settings: dict | None = None, **extra) -> dict:
    train = {**(settings or SHORT), "objective": objective, "distributed": distributed, **extra.pop("train", {})}
    return {"student": str(world.student), "teacher": str(world.teacher), "out": str(out), "n_pairs": 31,
            "train": train, **extra}


def results(proc: subprocess.CompletedProcess | subprocess.Popen, out: Path, stderr: str) -> list[dict]:
    """The result of every rank, by rank (each writes its own file: the ranks share stdout)."""
    assert proc.returncode == 0, stderr[-4000:]
    found = [json.loads(p.read_text()) for p in out.glob("result-*.json")]
    for p in out.glob("result-*.json"):
        p.unlink()  # a later run in the same directory reports afresh
    return sorted(found, key=lambda r: r["rank"])


def run(spec: dict, nproc: int, timeout: float = 240) -> list[dict]:
    proc = subprocess.run(command(spec, nproc), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    return results(proc, Path(spec["out"]), proc.stderr)


def start(spec: dict, nproc: int) -> subprocess.Popen:
    """A run left going; its stderr goes to `<out>.stderr` (a pipe nobody reads could fill up)."""
    with open(Path(spec["out"]).with_suffix(".stderr"), "w") as err:
        return subprocess.Popen(command(spec, nproc), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=err)


def stderr_of(proc: subprocess.Popen, out: Path) -> str:
    proc.wait()
    return out.with_suffix(".stderr").read_text()


def kill_all(proc: subprocess.Popen, out: Path, nproc: int) -> None:
    """SIGKILL to every rank and to torchrun, as the end of a job's allocation does (torchrun
    starts each rank in a session of its own, so killing torchrun alone leaves them running)."""
    for rank in range(nproc):
        os.kill(int((out / f"pid-{rank}").read_text()), signal.SIGKILL)
    proc.kill()
    proc.wait()


def wait_for_checkpoint(out: Path, step: int, proc: subprocess.Popen, seconds: float = 120) -> None:
    path = out / "checkpoints" / f"step-{step:08d}" / "hashes.json"
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, stderr_of(proc, out)[-4000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def same_on_every_rank(ranks: list[dict]) -> dict:
    assert [r["rank"] for r in ranks] == list(range(len(ranks)))
    keep = ("step", "loss", "finished", "resumed_from", "checkpoint", "history")
    assert all({k: r[k] for k in keep} == {k: ranks[0][k] for k in keep} for r in ranks), ranks
    return ranks[0]


@pytest.fixture(scope="module")
def one_process(tiny_world, tmp_path_factory):
    """The single-process run of an objective (with its settings), run once per module."""
    done: dict[str, tuple[dict, Path]] = {}

    def get(objective: str, **train) -> tuple[dict, Path]:
        key = json.dumps([objective, train], sort_keys=True)
        if key not in done:
            out = tmp_path_factory.mktemp("one")
            (result,) = run(spec(tiny_world, out, "none", objective, train=train), 0)
            done[key] = result, out
        return done[key]
    return get


@pytest.fixture(scope="module")
def two_ranks(tiny_world, tmp_path_factory):
    """The uninterrupted two-rank run of LONG, per mode, run once per module."""
    done: dict[str, dict] = {}

    def get(distributed: str) -> dict:
        if distributed not in done:
            out = tmp_path_factory.mktemp(f"two-{distributed}")
            done[distributed] = same_on_every_rank(run(spec(tiny_world, out, distributed, settings=LONG), 2))
        return done[distributed]
    return get


@pytest.mark.parametrize("distributed, objective, lora", [("ddp", "sft", False), ("ddp", "kd", False),
                                                          ("fsdp", "sft", False), ("fsdp", "kd", False),
                                                          ("ddp", "sft", True), ("ddp", "onpolicy", False)])
def test_two_ranks_take_the_steps_of_one_process_at_the_same_global_batch(tiny_world, tmp_path, one_process,
                                                                          distributed, objective, lora):
    """Each step's loss (and cross-entropy) of two ranks equals one process's within 1e-4
    (relative), kd with the teacher online in every rank; the final model, gathered from the
    shards under fsdp and merged from LoRA, matches too."""
    from safetensors.torch import load_file

    train = {"lora": {"enabled": True}} if lora else {}
    reference, ref_out = one_process(objective, **train)
    started = time.perf_counter()
    ranks = run(spec(tiny_world, tmp_path, distributed, objective, train=train), 2)
    seconds = time.perf_counter() - started
    assert len(ranks) == 2
    result = same_on_every_rank(ranks)
    assert result["finished"] and result["step"] == reference["step"] == 6
    assert [h["step"] for h in result["history"]] == [h["step"] for h in reference["history"]] == list(range(1, 7))
    worst = max([relative(h[k], r[k]) for h, r in zip(result["history"], reference["history"], strict=True)
                 for k in ("loss", "ce")] + [relative(result["loss"], reference["loss"])])
    print(f"{distributed} {objective}{' lora' if lora else ''}: 6 steps on 2 ranks in {seconds:.1f} s, "
          f"largest relative difference of a step's loss or ce from one process: {worst:.2e}")
    assert worst <= 1e-4, (result["history"], reference["history"])
    mine, theirs = (load_file(str(tmp_path / "model" / "model.safetensors")),
                    load_file(str(ref_out / "model" / "model.safetensors")))
    assert sorted(mine) == sorted(theirs) and not any("lora" in k for k in mine)
    assert max(float((mine[k] - theirs[k]).abs().max()) for k in mine) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_a_killed_two_rank_run_resumes_from_its_newest_complete_checkpoint(tiny_world, tmp_path, two_ranks,
                                                                            distributed):
    """torchrun and both ranks SIGKILLed mid-run: the rerun resumes from the newest sealed
    checkpoint (a save cut short is ignored) and ends at the uninterrupted run's step and loss."""
    reference = two_ranks(distributed)

    out = tmp_path / "killed"
    proc = start(spec(tiny_world, out, distributed, settings=LONG, step_sleep=0.1), 2)
    wait_for_checkpoint(out, 4, proc)
    kill_all(proc, out, 2)
    newest = newest_checkpoint(out / "checkpoints")
    assert newest is not None and not (out / "model").exists(), "the kill did not land mid-run"
    (out / "checkpoints" / ".tmp-step-00000099-1").mkdir()  # a save cut short
    (out / "checkpoints" / ".tmp-step-00000099-1" / "state.json").write_text("{}")

    result = same_on_every_rank(run(spec(tiny_world, out, distributed, settings=LONG), 2))
    assert result["resumed_from"] == int(newest.name.split("-")[1]) >= 4
    assert result["finished"] and result["step"] == reference["step"] == 12
    print(f"{distributed}: killed, newest checkpoint {newest.name}, resumed to step 12; "
          f"final loss {result['loss']:.6f} vs "
          f"{reference['loss']:.6f} uninterrupted (diff {abs(result['loss'] - reference['loss']):.1e})")
    assert abs(result["loss"] - reference["loss"]) <= 1e-6
    timed = ("time", "tokens_per_s")  # how fast each step ran differs; every other logged value is equal
    assert [{k: v for k, v in h.items() if k not in timed} for h in result["history"]] == \
        [{k: v for k, v in h.items() if k not in timed} for h in reference["history"]]
    assert not (out / "checkpoints" / ".tmp-step-00000099-1").exists()
    assert (out / "model" / "config.json").exists()


@pytest.mark.slow
def test_usr2_to_one_rank_stops_both_at_the_same_step_and_fsdp_resumes_on_one_rank(tiny_world, tmp_path, two_ranks):
    """SLURM's stop signal reaching rank 1 alone: both ranks checkpoint and return at the same
    step. The sharded checkpoint then resumes on one rank (resharded by
    torch.distributed.checkpoint) and ends where two uninterrupted ranks end; resuming it
    without fsdp is refused in one line."""
    reference = two_ranks("fsdp")

    out = tmp_path / "stopped"
    proc = start(spec(tiny_world, out, "fsdp", settings=LONG, step_sleep=0.2), 2)
    wait_for_checkpoint(out, 4, proc)
    os.kill(int((out / "pid-1").read_text()), signal.SIGUSR2)
    proc.wait(timeout=120)
    stopped = same_on_every_rank(results(proc, out, stderr_of(proc, out)))
    assert not stopped["finished"] and 4 <= stopped["step"] < 12
    assert stopped["checkpoint"] == f"step-{stopped['step']:08d}" == newest_checkpoint(out / "checkpoints").name

    with pytest.raises(AssertionError, match=r"written with train.distributed fsdp; this run has none"):
        run(spec(tiny_world, out, "none", settings=LONG), 0)
    result = same_on_every_rank(run(spec(tiny_world, out, "fsdp", settings=LONG), 1))
    assert result["resumed_from"] == stopped["step"]
    assert result["finished"] and result["step"] == 12
    print(f"fsdp: stopped at step {stopped['step']} on 2 ranks, resumed on 1 to step 12; final loss relative "
          f"difference from 2 uninterrupted ranks {relative(result['loss'], reference['loss']):.1e}")
    assert relative(result["loss"], reference["loss"]) <= 1e-4


@pytest.fixture
def slurm() -> None:
    """The local test cluster (slurm/local/), skipped when it is not up."""
    from slurm_cluster import require_slurm

    require_slurm()
    out = subprocess.run(["sinfo", "--noheader", "--format=%R"], capture_output=True, text=True, check=False)
    if "debug" not in out.stdout.split():
        pytest.skip("not the local test cluster: no partition debug (see slurm/local/)")


@pytest.mark.slurm
@pytest.mark.parametrize("distributed, objective", [("ddp", "sft"), ("ddp", "kd"), ("fsdp", "sft"), ("fsdp", "kd")])
def test_two_slurm_tasks_rendezvous_and_train_as_one_process_as_two_nodes_would(slurm, tiny_world, tmp_path,
                                                                                 one_process, distributed, objective):
    """`srun -n2`, each task a torchrun of one rank meeting the other at a c10d rendezvous (as
    on two nodes of one rank each): ddp and fsdp, sft and kd, take the steps of one process;
    under fsdp both tasks write their shards into the one checkpoint, under ddp rank 0 writes
    the replicated weights."""
    import socket
    import uuid

    reference, _ = one_process(objective)
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    launch = [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
              "--rdzv_endpoint", f"{host}:{port}", "--rdzv_id", uuid.uuid4().hex,
              "-m", "tests.dist_train", json.dumps(spec(tiny_world, tmp_path, distributed, objective))]
    # --overcommit: two tasks even where one of the node's two cores is taken.
    proc = subprocess.run(["srun", "--partition", "debug", "-N1", "-n2", "--overcommit", "--time", "5",
                           "--job-name", "distill-test-ranks", *launch],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=400)
    ranks = results(proc, tmp_path, proc.stderr)
    assert len(ranks) == 2
    result = same_on_every_rank(ranks)
    assert result["finished"] and result["step"] == 6
    for h, r in zip(result["history"], reference["history"], strict=True):
        assert relative(h["loss"], r["loss"]) <= 1e-4, (h, r)
    checkpoint = tmp_path / "checkpoints" / "step-00000006"
    shards = sorted(p.name for p in checkpoint.glob("*.distcp"))
    if distributed == "fsdp":
        assert shards == ["__0_0.distcp", "__1_0.distcp"]
    else:
        assert shards == [] and (checkpoint / "weights.safetensors").is_file()


# -- without processes ----------------------------------------------------------------------------


def test_the_ranks_parts_of_a_micro_batch_make_it_whole():
    batch = [7, 3, 9, 1, 4]
    for world in (1, 2, 3, 5):
        parts = [Ranks(rank=r, world=world).part(batch) for r in range(world)]
        assert [i for idx, counted in parts for i in idx] == batch and all(c for _, c in parts)
    lone = [Ranks(rank=r, world=2).part([6]) for r in range(2)]
    assert lone == [([6], False), ([6], True)]  # rank 0 runs example 6 uncounted


def test_distributed_none_under_a_multi_process_torchrun_is_refused(monkeypatch):
    import torch

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistillError, match=r"^train.distributed: none, but this process is rank 1 of WORLD_SIZE=2"), \
            join("none", torch.device("cpu")):
        pass


def test_fsdp_cannot_shard_4bit_weights_and_the_new_key_keeps_run_hashes(tmp_path):
    base = "name: demo\nmodels: {teacher: m/t, student: m/s}\ndata: {train: d/train.jsonl, test: d/test.jsonl}\n"
    (tmp_path / "old.yaml").write_text(base)
    (tmp_path / "none.yaml").write_text(base + "train: {distributed: none}\n")
    (tmp_path / "ddp.yaml").write_text(base + "train: {distributed: ddp}\n")
    hashes = [load_config(tmp_path / f"{name}.yaml").hash() for name in ("old", "none", "ddp")]
    assert hashes[0] == hashes[1] != hashes[2]
    qlora = tmp_path / "qlora.yaml"
    qlora.write_text(base + "train: {distributed: fsdp, quantize: 4bit, lora: {enabled: true}}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(qlora)
    assert str(exc.value) == (f"{qlora}: train.distributed: fsdp cannot shard 4-bit (QLoRA) weights; use ddp, or "
                              "quantize: none")
    check_train(TrainConfig(distributed="ddp", quantize="4bit", lora=LoraConfig(enabled=True)), "c.yaml")
