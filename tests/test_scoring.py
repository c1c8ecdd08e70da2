"""The score stage: the teacher's top-k over the student's training tokens in array shards,
resumed after a kill with every example stored once, equal to a direct teacher forward, and
read by offline KD instead of loading the teacher."""

from __future__ import annotations

import pytest
import torch

from distill import pipeline, scoring
from distill.config import load_config
from distill.distillation import teacher_topk
from distill.layout import RunPaths
from distill.modeling import load_teacher
from distill.prompts import training_pairs
from distill.topk_store import TopKStore, gap_codes
from distill.training import train
from distill.training_set import training_set
from tests.conftest import merge_stage_units, run_stage_unit
from tests.test_integrity import finished_verify

OFFLINE = ["train.objective=kd", "train.kd.teacher=offline", "train.kd.top_k=8", "generation.num_shards=2",
           "generation.batch_size=5", "train.max_steps=3"]


def config(tiny_world, tmp_path, *sets: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return load_config(tiny_world.write_config(tmp_path / "c.yaml", tmp_path / "runs", name="r"), [*OFFLINE, *sets])


def scored(cfg) -> TopKStore:
    for shard in ("0", "1"):
        run_stage_unit(cfg, 0, "score", shard)
    merge_stage_units(cfg, 0, "score")
    return TopKStore.load(RunPaths(cfg.run_dir).scores(0, 8))[0]


def test_the_stage_is_in_the_plan_only_for_stored_teacher_logprobs(tiny_world, tmp_path):
    assert "score" in [s.name for s in pipeline.iteration_plan(0, config(tiny_world, tmp_path))]
    sft = config(tiny_world, tmp_path, "train.objective=sft")
    assert "score" not in [s.name for s in pipeline.iteration_plan(0, sft)]
    kd_later = config(tiny_world, tmp_path, "train.objective=sft", "undo.objective=kd")
    assert [scoring.needed(kd_later, it) for it in (0, 1)] == [False, True]


def test_stored_scores_are_a_direct_teacher_forward_on_the_students_tokens(tiny_world, tmp_path):
    cfg = config(tiny_world, tmp_path)
    finished_verify(cfg)
    store = scored(cfg)
    examples, vocab = scoring.score_examples(cfg, 0)
    assert len(examples) == 24 and len(store.offsets) == 25
    from distill.device import placement

    teacher = load_teacher(tiny_world.teacher, placement("fp32", "cpu"))
    (ids, logprobs, counts), = teacher_topk(teacher, examples, 8, vocab, batch_size=len(examples))
    assert store.tokens == sum(counts) == ids.size(0)
    rows = [store.rows(i) for i in range(len(examples))]
    assert torch.cat([r[0] for r in rows]).equal(ids.long())
    direct = logprobs - logprobs[:, :1]  # relative to each token's best, as stored
    stored = torch.cat([r[1] for r in rows])
    assert (stored - direct).abs().max() <= 1 / 32 + 1e-4  # the store's precision
    # the codes of the direct forward, but for a rounding boundary crossed by the other batching
    assert (torch.from_numpy(store.codes.copy()).int() - gap_codes(logprobs).int()).abs().max() <= 1


def test_a_shard_killed_mid_part_resumes_with_every_example_once(tiny_world, tmp_path, monkeypatch):
    cfg = config(tiny_world, tmp_path)
    finished_verify(cfg)
    whole = scored(cfg)
    run2 = config(tiny_world, tmp_path / "again")
    finished_verify(run2)
    seen: list[list[int]] = []
    real = scoring.teacher_scores

    def counting(backend, examples, k, vocab):
        seen.extend(e["input_ids"] for e in examples)
        yield from real(backend, examples, k, vocab)

    monkeypatch.setattr(scoring, "teacher_scores", counting)
    saves = {"n": 0}
    save = TopKStore.save

    def dies_on_the_second_part(self, path, meta):
        saves["n"] += 1
        if saves["n"] == 2:  # killed after writing the temporary file, before the rename
            (path.parent / f".tmp-{path.name}-1").write_bytes(b"half a file")
            raise KeyboardInterrupt
        save(self, path, meta)

    monkeypatch.setattr(TopKStore, "save", dies_on_the_second_part)
    with pytest.raises(KeyboardInterrupt):
        scoring.score(_unit(run2, "0"))
    folder = RunPaths(run2.run_dir).score_shard(0, 0, 2)
    assert [p.name for p in sorted(folder.glob("part-*"))] == ["part-00000000-00000005.safetensors"]
    monkeypatch.setattr(TopKStore, "save", save)
    seen.clear()
    assert scoring.score(_unit(run2, "0")).fields["examples"] == 12
    assert len(seen) == 7  # examples 5-11: the whole first part is not scored again
    assert not list(folder.glob(".tmp-*"))
    again = scored(run2)
    assert [p.name for p in sorted(folder.glob("part-*"))] == ["part-00000000-00000005.safetensors",
                                                                 "part-00000005-00000010.safetensors",
                                                                 "part-00000010-00000012.safetensors"]
    assert (again.codebook[again.ids.astype(int)] == whole.codebook[whole.ids.astype(int)]).all()
    assert (again.codes == whole.codes).all() and again.offsets.equal(whole.offsets)


def _unit(cfg, key: str):
    from distill.stage import Unit

    return Unit(cfg=cfg, iteration=0, key=key, paths=RunPaths(cfg.run_dir), progress=False)


def test_offline_kd_reads_the_store_and_never_loads_the_teacher(tiny_world, tmp_path, monkeypatch):
    cfg = config(tiny_world, tmp_path)
    finished_verify(cfg)
    scored(cfg)
    from distill.modeling import load_tokenizer

    pairs = training_pairs(cfg.prompt, training_set(cfg, 0), load_tokenizer(tiny_world.student))
    captured = train(tiny_world.student, pairs, cfg.train, tmp_path / "captured", progress=False,
                     teacher_path=tiny_world.teacher)
    import distill.distillation

    def no_teacher(*a, **kw):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(distill.distillation, "load_teacher", no_teacher)
    store = RunPaths(cfg.run_dir).scores(0, 8)
    from_store = train(tiny_world.student, pairs, cfg.train, tmp_path / "stored", progress=False,
                       teacher_path=tiny_world.teacher, topk_store=store)
    # the same top-k of the same forward, batched differently: equal to rounding
    assert from_store.loss == pytest.approx(captured.loss, abs=1e-4)
    assert not (tmp_path / "stored" / "teacher-top8.safetensors").exists()
    with pytest.raises(Exception, match="scored top-8 over other tokens than the 23 examples"):
        train(tiny_world.student, pairs[1:], cfg.train, tmp_path / "other", progress=False,
              teacher_path=tiny_world.teacher, topk_store=store)
