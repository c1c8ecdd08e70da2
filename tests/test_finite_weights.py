"""Non-finite weights are never sealed, saved or recorded done.

A finite loss does not prove the update after it left finite weights, and a hash proves only that
a file is the one written: training checks the trainable weights after every update, and repair
takes a model only when it matches the sealed checkpoint it came from and holds finite tensors.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from distill import pipeline
from distill.errors import DistillError
from distill.integrity import content_hash, nonfinite_tensor, seal
from distill.layout import RunPaths, complete_checkpoints
from distill.manifest import Manifest
from distill.repair import recover_stage, repair
from distill.runner import first_line
from distill.train_config import TrainConfig
from distill.training import model_record, nonfinite, train
from tests.conftest import ROOT, run_stage_unit
from tests.test_integrity import config, failure, finished_verify
from tests.test_training import pairs


@pytest.fixture
def poison_after() -> Iterator[list[int]]:
    """Set one element of the first trainable parameter to NaN right after optimizer step k
    (append k to the list; steps count from 1 in each `train` call). The loss of step k was
    finite: only a check of the weights sees it before step k + 1."""
    at: list[int] = []
    seen = {"steps": 0}

    def hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        seen["steps"] += 1
        if seen["steps"] in at:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")

    handle = register_optimizer_step_post_hook(hook)
    yield at
    handle.remove()


def nan_everywhere(path: Path) -> None:
    """One element of every tensor of a safetensors file set to NaN."""
    tensors = load_file(str(path))
    for t in tensors.values():
        t.view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_the_check_sees_nan_and_inf_anywhere_but_not_large_finite_weights():
    big = [torch.full((4, 4), 1e30), torch.full((3,), -3e38), torch.ones(5, dtype=torch.bfloat16)]
    assert nonfinite(big).item() == 0.0  # the 2-norm of these overflows; the weights are finite
    for bad in (float("nan"), float("inf"), float("-inf")):
        weights = [t.clone() for t in big]
        weights[2][3] = bad
        assert nonfinite(weights).item() == 1.0


@pytest.mark.parametrize("poisoned, save_steps, lora, kept", [
    (3, 2, False, "step-00000002"),  # between saves: seen with the next step's loss
    (4, 2, False, "step-00000002"),  # at a save: seen before step 4 is sealed
    (1, 1, False, None),  # the first update: no checkpoint to go back to
    (2, 1, True, "step-00000001"),  # LoRA: the adapters are what is trained and checked
])
def test_non_finite_weights_stop_the_unit_before_they_are_sealed_or_saved(
        tiny_world, tmp_path, poison_after, poisoned, save_steps, lora, kept):
    cfg = config(tiny_world, tmp_path, f"train.save_steps={save_steps}", f"train.lora.enabled={lora}")
    paths = finished_verify(cfg)
    poison_after.append(poisoned)

    error = failure(cfg, 0, "train")
    ckpts = paths.train(0).checkpoints
    where = f"the last checkpoint with finite weights is {ckpts / kept}" if kept else \
        "no checkpoint with finite weights was written yet"
    line = (f"train: weights are not finite after step {poisoned}: stopped before saving them; {where} "
            "(lower train.lr, or check the model and data)")
    assert error == first_line(DistillError(line))  # recorded as the unit's reason, as any DistillError is
    assert (kept or "no checkpoint with finite weights") in error
    assert [c.name for c in complete_checkpoints(ckpts)][-1:] == ([kept] if kept else [])
    assert not paths.student(0).exists() and not model_record(paths.train(0)).exists()
    entry = Manifest(paths.root).stage(0, "train")
    assert entry["state"] == "failed" and entry["error"] == error and "artifacts" not in entry

    poison_after.clear()  # the cause is gone: the rerun resumes from the finite checkpoint and finishes
    assert run_stage_unit(cfg, 0, "train")["step"] == 6
    assert Manifest(paths.root).stage(0, "train")["state"] == "done"


def test_a_non_finite_loss_names_the_last_checkpoint_whose_weights_are_finite(tiny_world, tmp_path):
    """A sealed checkpoint with NaN weights (one written before weights were checked) is resumed;
    the loss of the next step is NaN, and the checkpoint named as good is the one before it."""
    cfg = TrainConfig(lr=1e-2, max_steps=6, batch_size=8, save_steps=1, max_length=64)
    calls = iter(range(100))
    first = train(tiny_world.student, pairs(), cfg, tmp_path / "run", progress=False,
                  should_stop=lambda: next(calls) == 1)
    assert first.step == 2 and not first.finished
    step2 = tmp_path / "run" / "checkpoints" / "step-00000002"
    nan_everywhere(step2 / "weights.safetensors")
    seal(step2)
    with pytest.raises(DistillError, match=re.escape("train: loss is nan at step 3: stopped before the update; the "
                                                     f"last good checkpoint is {step2.with_name('step-00000001')} (")):
        train(tiny_world.student, pairs(), cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "model").exists()


RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from distill.train_config import TrainConfig
    from distill.errors import DistillError
    from distill.ranks import exit_rank
    from distill.training import train
    from tests.test_training import pairs

    student, out, distributed, poisoned = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rank, steps = int(os.environ["RANK"]), [0]

    def hook(optimizer, args, kwargs):
        steps[0] += 1
        p = optimizer.param_groups[0]["params"][0]
        local = p.to_local() if hasattr(p, "to_local") else p
        if rank == 1 and steps[0] == poisoned:  # this rank's replica or shard alone
            with torch.no_grad():
                local.view(-1)[0] = float("nan")

    register_optimizer_step_post_hook(hook)
    cfg = TrainConfig(lr=1e-2, max_steps=6, batch_size=4, save_steps=2, max_length=64, distributed=distributed)
    try:
        train(student, pairs()[:16], cfg, out, progress=False, device="cpu")
        line = "finished"
    except DistillError as exc:
        line = str(exc)
    with open(os.path.join(out, f"error-{rank}.txt"), "w") as f:
        f.write(line)
    exit_rank(0)
""")


@pytest.mark.slow
@pytest.mark.parametrize("distributed, poisoned", [("fsdp", 3), ("ddp", 4)])
def test_every_rank_stops_when_one_ranks_weights_are_not_finite(tiny_world, tmp_path, distributed, poisoned):
    """NaN in rank 1's shard (fsdp) or replica (ddp) only: the ranks sum their checks, so both stop
    at the same step with the same line, and none waits in a collective for the other."""
    script, out = tmp_path / "poisoned.py", tmp_path / "run"
    script.write_text(RANK_SCRIPT)
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                           "--standalone", str(script), str(tiny_world.student), str(out), distributed, str(poisoned)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [(out / f"error-{rank}.txt").read_text() for rank in (0, 1)]
    assert lines[0] == lines[1] == (
        f"train: weights are not finite after step {poisoned}: stopped before saving them; the last checkpoint "
        f"with finite weights is {out / 'checkpoints' / 'step-00000002'} (lower train.lr, or check the model and data)")
    assert [c.name for c in complete_checkpoints(out / "checkpoints")] == ["step-00000002"]
    assert not (out / "model").exists()


def repaired(cfg) -> dict:
    """The train stage's entry after the manifest is deleted and rebuilt by `distill repair`."""
    paths = RunPaths(cfg.run_dir)
    paths.manifest.unlink()
    repair(paths.root)
    return Manifest(paths.root).stage(0, "train")


def test_repair_takes_a_model_only_when_it_matches_its_checkpoint_and_is_finite(tiny_world, tmp_path, caplog):
    cfg = config(tiny_world, tmp_path)
    paths = finished_verify(cfg)
    run_stage_unit(cfg, 0, "train")
    clean = Manifest(paths.root).stage(0, "train")["artifacts"]

    entry = repaired(cfg)
    assert entry["state"] == "done" and entry["artifacts"] == clean  # a sound run repairs as before

    weights = paths.student(0) / "model.safetensors"
    nan_everywhere(weights)
    entry = repaired(cfg)
    assert entry.get("state", "pending") == "pending" and "artifacts" not in entry
    assert "not recovered (changed since it was saved (sha256 differs))" in caplog.text
    # The next run of train resumes at its final checkpoint, sets the NaN model aside, saves it again.
    assert run_stage_unit(cfg, 0, "train")["step"] == 6
    assert Manifest(paths.root).stage(0, "train")["artifacts"] == clean
    assert nonfinite_tensor(paths.train(0).root / "model.damaged") is not None

    # Damage the record agrees with (the model and its record rewritten together) is still refused.
    nan_everywhere(weights)
    record = model_record(paths.train(0))
    record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": content_hash(paths.student(0))}))
    caplog.clear()
    assert repaired(cfg).get("state", "pending") == "pending"
    assert re.search(r"not recovered \(model\.safetensors:\S+ is not finite\)", caplog.text), caplog.text

    # A model with no record of its checkpoint (saved before models had one) is not taken on trust.
    run_stage_unit(cfg, 0, "train")
    record.unlink()
    assert recover_stage(cfg, 0, pipeline.stage("train")) == "runs again"
