"""Verify before use: a damaged checkpoint, model or data file is never used silently.

Each test damages one artifact the way a disk, a user or a second process can (flipped bytes,
an edited line, a deleted file) and checks that the next consumer refuses it with one line
naming the file, that the stage which produced it is reopened, and that the rerun ends where an
undamaged run does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill import pipeline
from distill.config import load_config
from distill.integrity import artifact, content_hash
from distill.jsonl import read_jsonl
from distill.layout import RunPaths
from distill.manifest import Manifest
from distill.prompts import training_pairs
from distill.runner import run_unit
from distill.training import newest_checkpoint, train
from tests.conftest import merge_stage_units, run_stage_unit
from tests.test_slurm_pipeline import write_verified


def flip(path: Path, offset: int | None = None, n: int = 64) -> None:
    """Flip `n` bytes in the middle of a file (or at `offset`), leaving its size unchanged."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if offset is None else offset
    for i in range(start, min(start + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def config(tiny_world, tmp_path: Path, *sets: str):
    path = tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs", name="r")
    return load_config(path, list(sets))


def finished_verify(cfg) -> RunPaths:
    """A run whose verify stage finished: the gold solutions as its verified set, recorded."""
    paths = RunPaths(cfg.run_dir)
    write_verified(paths.root, Path(cfg.data.train), 24)
    Manifest(paths.root).mark(0, "verify", "done", artifacts={"verified": artifact(paths.verified(0), paths.root)})
    return paths


def failure(cfg, it: int, name: str, key: str = "0") -> str:
    outcome = run_unit(cfg, it, pipeline.stage(name), key, progress=False)
    assert outcome.state == "failed", outcome
    return outcome.error


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_set_aside_and_training_resumes_from_the_one_before(
        tiny_world, tmp_path, caplog):
    cfg = config(tiny_world, tmp_path, "train.max_steps=8", "train.save_steps=2", "train.keep_checkpoints=3")
    records = [{"question": p["question"], "response": p["solution"]} for p in read_jsonl(Path(cfg.data.train))]
    from distill.modeling import load_tokenizer

    pairs = training_pairs(cfg.prompt, records, load_tokenizer(tiny_world.student))
    whole = train(tiny_world.student, pairs, cfg.train, tmp_path / "whole", progress=False)
    steps = iter(range(100))
    stopped = train(tiny_world.student, pairs, cfg.train, tmp_path / "cut", progress=False,
                    should_stop=lambda: next(steps) >= 5)  # stops after step 6
    assert not stopped.finished and stopped.step == 6
    ckpts = tmp_path / "cut" / "checkpoints"
    assert newest_checkpoint(ckpts).name == "step-00000006"
    flip(ckpts / "step-00000006" / "weights.safetensors")

    resumed = train(tiny_world.student, pairs, cfg.train, tmp_path / "cut", progress=False)
    assert resumed.resumed_from == 4  # not the damaged step 6
    assert "step-00000006 is damaged (weights.safetensors does not match its hash)" in caplog.text
    assert (ckpts / "damaged-step-00000006").is_dir()
    assert resumed.step == whole.step == 8
    assert resumed.loss == pytest.approx(whole.loss, abs=1e-6)
    assert content_hash(tmp_path / "cut" / "model") == content_hash(tmp_path / "whole" / "model")


@pytest.mark.slow
def test_an_edited_verified_set_is_refused_before_training_and_verify_is_reopened(tiny_world, tmp_path):
    cfg = config(tiny_world, tmp_path)
    paths = finished_verify(cfg)
    lines = paths.verified(0).read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace('"correct": true', '"correct": true, "note": "edited"')
    paths.verified(0).write_text("".join(lines))

    error = failure(cfg, 0, "train")
    assert error.startswith(f"{paths.verified(0)}: changed since verify of iteration 0 recorded it")
    assert "verify of iteration 0 is marked pending: run again to redo it" in error
    assert Manifest(paths.root).stage(0, "verify")["state"] == "pending"
    assert not paths.train(0).checkpoints.exists()  # nothing trained on it


@pytest.mark.slow
def test_a_damaged_final_model_is_refused_before_evaluation_and_train_saves_it_again(tiny_world, tmp_path):
    cfg = config(tiny_world, tmp_path)
    paths = finished_verify(cfg)
    run_stage_unit(cfg, 0, "train")
    clean = Manifest(paths.root).stage(0, "train")["artifacts"]["model"]["sha256"]
    weights = paths.student(0) / "model.safetensors"
    flip(weights)

    error = failure(cfg, 0, "evaluate", "student:0")
    assert error.startswith(f"{paths.student(0)}: changed since train of iteration 0 recorded it")
    assert Manifest(paths.root).stage(0, "train")["state"] == "pending"
    assert not list(paths.eval(0, 1).root.glob("student*"))  # nothing evaluated
    assert (paths.train(0).root / "model.damaged" / "model.safetensors").is_file() and not paths.student(0).exists()

    # The rerun of train resumes from its final checkpoint and saves the same model again.
    metrics = run_stage_unit(cfg, 0, "train")
    assert metrics["step"] == 6
    assert Manifest(paths.root).stage(0, "train")["artifacts"]["model"]["sha256"] == clean
    run_stage_unit(cfg, 0, "evaluate", "student:0")


@pytest.mark.slow
def test_a_deleted_or_damaged_merged_file_is_merged_again_from_its_shards(tiny_world, tmp_path):
    cfg = config(tiny_world, tmp_path, "data.train_limit=8", "generation.n=1")
    paths = RunPaths(cfg.run_dir)
    for shard in ("0", "1"):
        run_stage_unit(cfg, 0, "generate", shard)
    merge_stage_units(cfg, 0, "generate")
    clean = paths.generations(0).read_bytes()

    for damage in (lambda p: p.unlink(), lambda p: flip(p, n=8)):
        damage(paths.generations(0))
        error = failure(cfg, 0, "verify")
        assert str(paths.generations(0)) in error and "generate of iteration 0 is marked pending" in error
        entry = Manifest(paths.root).stage(0, "generate")
        assert entry["state"] == "pending" and all(s["state"] == "done" for s in entry["shards"].values())
        merge_stage_units(cfg, 0, "generate")  # what the driver does for a stage whose shards are done
        assert paths.generations(0).read_bytes() == clean
        run_stage_unit(cfg, 0, "verify")


@pytest.mark.slow
def test_a_damaged_topk_store_is_captured_again(tiny_world, tmp_path, caplog):
    cfg = config(tiny_world, tmp_path, "train.objective=kd", "train.kd.teacher=offline", "train.kd.top_k=4",
                 "train.max_steps=2")
    records = [{"question": p["question"], "response": p["solution"]} for p in read_jsonl(Path(cfg.data.train))]
    from distill.modeling import load_tokenizer

    pairs = training_pairs(cfg.prompt, records, load_tokenizer(tiny_world.student))
    first = train(tiny_world.student, pairs, cfg.train, tmp_path / "a", progress=False, teacher_path=tiny_world.teacher)
    store = tmp_path / "a" / "teacher-top4.safetensors"
    info = json.loads((tmp_path / "a" / "teacher-topk.json").read_text())
    from distill.distillation import TopKStore

    loaded, _ = TopKStore.load(store)
    clean = {t: getattr(loaded, t).copy() for t in ("codebook", "ids", "codes")}
    flip(store, offset=store.stat().st_size - 200, n=16)
    import shutil

    shutil.rmtree(tmp_path / "a" / "checkpoints")
    again = train(tiny_world.student, pairs, cfg.train, tmp_path / "a", progress=False, teacher_path=tiny_world.teacher)
    assert "damaged (sha256 differs" in caplog.text
    again_store, _ = TopKStore.load(store)
    assert all((getattr(again_store, t) == clean[t]).all() for t in clean)
    # The record names the new file (safetensors orders its metadata freely, so its bytes may differ).
    assert json.loads((tmp_path / "a" / "teacher-topk.json").read_text())["sha256"] == content_hash(store)
    assert "sha256" in info
    assert again.loss == pytest.approx(first.loss, abs=1e-6)


@pytest.mark.slow
def test_an_eval_shard_written_by_another_model_is_redone(tiny_world, tmp_path):
    """The stale-evaluation case: shards of a damaged model stay on disk, the model is restored
    and the manifest rebuilt; the shards must not be resumed."""
    cfg = config(tiny_world, tmp_path)
    paths = finished_verify(cfg)
    run_stage_unit(cfg, 0, "train")
    ev = paths.eval(0, 1)
    run_stage_unit(cfg, 0, "evaluate", "student:0")
    clean = ev.graded_shard("student", 0).read_bytes()

    # Shards answered by another model (a damaged copy, since restored) sit where the student's go.
    record = ev.shard("student", 0).with_name(ev.shard("student", 0).name + ".source.json")
    source = json.loads(record.read_text())
    assert source["model"] == "sha256:" + Manifest(paths.root).stage(0, "train")["artifacts"]["model"]["sha256"]
    record.write_text(json.dumps({**source, "model": "sha256:" + "0" * 64}))
    for p in (ev.shard("student", 0), ev.graded_shard("student", 0)):
        p.write_text(p.read_text().replace('"correct": false', '"correct": true')
                     .replace('"response": "', '"response": "STALE'))

    run_stage_unit(cfg, 0, "evaluate", "student:0")  # the student's own unit: the shard is redone
    assert ev.graded_shard("student", 0).read_bytes() == clean
    assert json.loads(record.read_text()) == source


@pytest.mark.slow
def test_a_generation_shard_from_other_settings_is_redone_not_resumed(tiny_world, tmp_path):
    cfg = config(tiny_world, tmp_path, "data.train_limit=8", "generation.n=1")
    paths = RunPaths(cfg.run_dir)
    run_stage_unit(cfg, 0, "generate", "0")
    shard = paths.gen_shard(0, 0, 2)
    clean = shard.read_bytes()
    hotter = load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs", name="r"),
                         ["data.train_limit=8", "generation.n=1", "generation.max_new_tokens=4"])
    Manifest(paths.root).set_meta(config_hash=hotter.hash())
    run_stage_unit(hotter, 0, "generate", "0")
    assert shard.read_bytes() != clean  # not the old records under the new settings
    assert all(r["n_tokens"] <= 4 for r in read_jsonl(shard))
