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

from distill.config import LoraConfig, TrainConfig, check_train, load_config
from distill.errors import ConfigError, DistillError
from distill.ranks import Ranks, join
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


def results(proc: subprocess.CompletedProcess | subprocess.Popen, stdout: str, stderr: str) -> list[dict]:
    """The RESULT of every rank, by rank."""
    assert proc.returncode == 0, stderr[-4000:]
    found = [json.loads(line[len("RESULT "):]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    return sorted(found, key=lambda r: r["rank"])


def run(spec: dict, nproc: int, timeout: float = 240) -> list[dict]:
    proc = subprocess.run(command(spec, nproc), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    return results(proc, proc.stdout, proc.stderr)


def start(spec: dict, nproc: int) -> subprocess.Popen:
    return subprocess.Popen(command(spec, nproc), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_all(proc: subprocess.Popen, out: Path, nproc: int) -> None:
    """SIGKILL to every rank and to torchrun, as the end of a job's allocation does (torchrun
    starts each rank in a session of its own, so killing torchrun alone leaves them running)."""
    for rank in range(nproc):
        os.kill(int((out / f"pid-{rank}").read_text()), signal.SIGKILL)
    proc.kill()
    proc.communicate()


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-4000:]
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


@pytest.mark.parametrize("distributed, objective, lora", [("ddp", "sft", False), ("ddp", "kd", False),
                                                          ("fsdp", "sft", False), ("fsdp", "kd", False),
                                                          ("ddp", "sft", True)])
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
    mine, theirs = load_file(str(tmp_path / "model" / "model.safetensors")), load_file(str(ref_out / "model" / "model.safetensors"))
    assert sorted(mine) == sorted(theirs) and not any("lora" in k for k in mine)
    assert max(float((mine[k] - theirs[k]).abs().max()) for k in mine) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_a_killed_two_rank_run_resumes_from_its_newest_complete_checkpoint(tiny_world, tmp_path, distributed):
    """torchrun and both ranks SIGKILLed mid-run: the rerun resumes from the newest sealed
    checkpoint (a save cut short is ignored) and ends at the uninterrupted run's step and loss."""
    reference = same_on_every_rank(run(spec(tiny_world, tmp_path / "ref", distributed, settings=LONG), 2))

    out = tmp_path / "killed"
    proc = start(spec(tiny_world, out, distributed, settings=LONG, step_sleep=0.1), 2)
    wait_for(out / "checkpoints" / "step-00000004" / "hashes.json", proc)
    kill_all(proc, out, 2)
    newest = newest_checkpoint(out / "checkpoints")
    assert newest is not None and not (out / "model").exists(), "the kill did not land mid-run"
    (out / "checkpoints" / ".tmp-step-00000099-1").mkdir()  # a save cut short
    (out / "checkpoints" / ".tmp-step-00000099-1" / "state.json").write_text("{}")

    result = same_on_every_rank(run(spec(tiny_world, out, distributed, settings=LONG), 2))
    assert result["resumed_from"] == int(newest.name.split("-")[1]) >= 4
    assert result["finished"] and result["step"] == reference["step"] == 12
    assert abs(result["loss"] - reference["loss"]) <= 1e-6
    assert result["history"] == reference["history"]
    assert not (out / "checkpoints" / ".tmp-step-00000099-1").exists()
    assert (out / "model" / "config.json").exists()


@pytest.mark.slow
def test_usr2_to_one_rank_stops_both_at_the_same_step_and_fsdp_resumes_on_one_rank(tiny_world, tmp_path):
    """SLURM's stop signal reaching rank 1 alone: both ranks checkpoint and return at the same
    step. The sharded checkpoint then resumes on one rank (resharded by
    torch.distributed.checkpoint) and ends where two uninterrupted ranks end; resuming it
    without fsdp is refused in one line."""
    reference = same_on_every_rank(run(spec(tiny_world, tmp_path / "ref", "fsdp", settings=LONG), 2))

    out = tmp_path / "stopped"
    proc = start(spec(tiny_world, out, "fsdp", settings=LONG, step_sleep=0.2), 2)
    wait_for(out / "checkpoints" / "step-00000004" / "hashes.json", proc)
    os.kill(int((out / "pid-1").read_text()), signal.SIGUSR2)
    stdout, stderr = proc.communicate(timeout=120)
    stopped = same_on_every_rank(results(proc, stdout, stderr))
    assert not stopped["finished"] and 4 <= stopped["step"] < 12
    assert stopped["checkpoint"] == f"step-{stopped['step']:08d}" == newest_checkpoint(out / "checkpoints").name

    with pytest.raises(AssertionError, match=r"written with train.distributed fsdp; this run has none"):
        run(spec(tiny_world, out, "none", settings=LONG), 0)
    result = same_on_every_rank(run(spec(tiny_world, out, "fsdp", settings=LONG), 1))
    assert result["resumed_from"] == stopped["step"]
    assert result["finished"] and result["step"] == 12
    assert relative(result["loss"], reference["loss"]) <= 1e-4


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
