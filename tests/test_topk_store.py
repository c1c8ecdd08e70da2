"""The coded top-k store: ids exact, the renormalised distribution within 1e-3 nats per token,
under 2 bytes per entry on a realistic spread of ids, and older files refused by format."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from distill import divergences
from distill.topk_store import TopKStore, gap_codes, renormalised_kl


def teacher_scores(n: int, k: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of peaked distributions over a vocabulary whose frequent tokens recur (Zipf-like
    logits), best first."""
    g = torch.Generator().manual_seed(seed)
    prior = -1.2 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    logits = prior + 4.0 * torch.randn(n, vocab, generator=g)
    top = logits.log_softmax(-1).topk(k, dim=-1)
    return top.indices.to(torch.int32), top.values


@pytest.mark.parametrize("k", [1, 8, 64])
def test_ids_round_trip_exactly_and_logprobs_within_1e_3_nats(tmp_path, k):
    ids, logprobs = teacher_scores(600, k, 3000)
    offsets = torch.tensor([0, 100, 100, 600])  # an example with no completion token too
    path = tmp_path / "top.safetensors"
    TopKStore.encode(ids, gap_codes(logprobs), offsets).save(path, {"teacher": "t"})
    store, meta = TopKStore.load(path)
    assert meta["teacher"] == "t" and meta["format"] == "topk-lzma-1"
    rows = [store.rows(i) for i in range(3)]
    assert [r[0].size(0) for r in rows] == [100, 0, 500]
    assert torch.cat([r[0] for r in rows]).equal(ids.long())
    stored = torch.cat([r[1] for r in rows])
    assert (stored[:, 0] == 0).all()
    error = renormalised_kl(logprobs, stored)
    assert error.max() <= 1e-3, error.max()
    if k > 1:  # random ids: smaller than int32 + float16, not the ≤ 2 bytes of real scores (bench/topk_storage.py)
        assert path.stat().st_size / ids.numel() < 6.0


def test_the_stored_loss_is_the_top_k_loss_within_the_store_precision():
    ids, logprobs = teacher_scores(200, 20, 500, seed=1)
    store = TopKStore.encode(ids, gap_codes(logprobs), torch.tensor([0, 200]))
    stored_ids, stored = store.rows(0)
    student = torch.randn(200, 500, generator=torch.Generator().manual_seed(2))  # far from the teacher
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        for t in (1.0, 2.0):
            exact, _ = divergences.topk_kd(student, ids, logprobs, kind, temperature=t)
            coded, _ = divergences.topk_kd(student, stored_ids, stored, kind, temperature=t)
            assert (exact.mean() - coded.mean()).abs() <= 1e-3 * exact.mean(), (kind, t)
            if kind == "reverse_kl":  # Σ q (log q - log p̂): each renormalised log p̂ moves by ≤ 2 · 1/32 / T
                assert (exact - coded).abs().max() <= 1 / 16 / t


def test_more_than_65536_distinct_ids_widen_the_codes(tmp_path):
    ids = torch.arange(70_000, dtype=torch.int32).reshape(-1, 2)
    logprobs = torch.tensor([[-0.1, -2.5]]).expand(ids.size(0), 2)
    TopKStore.encode(ids, gap_codes(logprobs), torch.tensor([0, ids.size(0)])).save(tmp_path / "w.safetensors", {})
    store, meta = TopKStore.load(tmp_path / "w.safetensors")
    assert meta["id_dtype"] == "uint32" and store.rows(0)[0].equal(ids.long())


def test_a_store_in_the_older_format_is_refused_by_name(tmp_path):
    path = tmp_path / "old.safetensors"
    save_file({"ids": torch.zeros(2, 3, dtype=torch.int32), "logprobs": torch.zeros(2, 3, dtype=torch.float16),
               "offsets": torch.tensor([0, 2])}, str(path))
    with pytest.raises(ValueError, match="int32 ids \\+ float16 logprobs, not topk-lzma-1"):
        TopKStore.load(path)
