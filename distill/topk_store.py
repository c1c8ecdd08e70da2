"""The teacher's top-k logprobs stored for offline KD, at under 2 bytes per (token, k) entry.

Training renormalises the teacher's k logprobs over its k ids (`divergences.topk_kd`), so an
entry is fully described by its id and its gap below the token's best logprob; the best one
itself is not kept. Each entry costs one id code and one gap code before compression:

- ids go through a codebook of the ids the store holds, most frequent first (a math corpus'
  top-k lists keep returning to the same few thousand tokens), as uint16 codes (uint32 past
  65,536 distinct ids);
- a gap x ≥ 0 nats is one byte, round(16·x): every stored logprob is within 1/32 nat of the
  teacher's, whichever side of the divergence weighs it (reverse KL and JSD weigh the tail by
  the student's probability, so a coarser tail would not do). Measured by
  `bench/topk_storage.py`: ≤ 3e-4 nats of KL per token between the renormalised top-k
  distributions on the demo teacher and on SmolLM2-135M at k = 20 and 64. Gaps past 15.9 nats
  (p/p_best < 1.2e-7) read as 15.9.

Both code streams are compressed with lzma (the standard library's) inside a safetensors file:
about 1.8 bytes per entry on SmolLM2's GSM8K scores against 6 for int32 ids + float16 logprobs.
In memory the store stays coded (3 bytes per entry) and `rows(i)` decodes one example's rows.
"""

from __future__ import annotations

import lzma
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distill.errors import writing

FORMAT = "topk-lzma-1"
STEPS_PER_NAT = 16
TOP_CODE = 255


def gap_codes(logprobs: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, k-1] of entries 2..k's gaps below entry 1 (rows sorted best first)."""
    gaps = (logprobs[:, :1].float() - logprobs[:, 1:].float()).clamp(min=0.0)
    return torch.round(gaps * STEPS_PER_NAT).clamp(max=TOP_CODE).to(torch.uint8)


def decoded_logprobs(codes: torch.Tensor) -> torch.Tensor:
    """float32 [N, k]: 0 for entry 1, minus the decoded gap for the others."""
    return torch.cat([torch.zeros(codes.size(0), 1), -codes.float() / STEPS_PER_NAT], dim=1)


def offsets_of(counts: list[int]) -> torch.Tensor:
    """int64 [E+1] row offsets of examples with `counts` completion tokens each."""
    return torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)


def renormalised_kl(true_logprobs: torch.Tensor, stored_logprobs: torch.Tensor) -> torch.Tensor:
    """Per token, KL(p‖p̂) in nats between the top-k distributions renormalised over their k ids,
    as training reads them."""
    p = torch.log_softmax(true_logprobs.float(), -1)
    q = torch.log_softmax(stored_logprobs.float(), -1)
    return (p.exp() * (p - q)).sum(-1)


@dataclass
class TopKStore:
    """Example i owns rows offsets[i]:offsets[i+1]: `codebook[ids]` are the teacher's k best ids
    of each of its completion tokens, best first, `codes` their gaps (`gap_codes`)."""

    codebook: np.ndarray  # int32 [C]
    ids: np.ndarray  # uint16 or uint32 [N, k], indices into codebook
    codes: np.ndarray  # uint8 [N, k-1]
    offsets: torch.Tensor  # int64 [E+1]

    @classmethod
    def encode(cls, ids: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor) -> TopKStore:
        """From the teacher's ids [N, k] and the `gap_codes` of their logprobs."""
        values, inverse, counts = torch.unique(ids.long(), return_inverse=True, return_counts=True)
        order = torch.sort(counts, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        coded = rank[inverse].numpy().astype(np.uint32 if values.numel() > 2**16 else np.uint16)
        return cls(values[order].numpy().astype(np.int32), coded, codes.numpy().astype(np.uint8), offsets.long())

    @classmethod
    def concat(cls, stores: list[TopKStore]) -> TopKStore:
        """One store of several (each with its codebook), their examples in order."""
        ids = torch.cat([torch.from_numpy(s.codebook[s.ids.astype(np.int64)]) for s in stores])
        codes = torch.cat([torch.from_numpy(s.codes.copy()) for s in stores])
        offsets = [0]
        for s in stores:
            offsets += (s.offsets[1:] + offsets[-1]).tolist()
        return cls.encode(ids, codes, torch.tensor(offsets, dtype=torch.int64))

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    @property
    def tokens(self) -> int:
        return self.ids.shape[0]

    def rows(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids int64 [n, k], logprobs float32 [n, k]) of example i; the logprobs are relative to
        each token's best one, which the renormalisation does not see."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = torch.from_numpy(self.codebook[self.ids[a:b].astype(np.int64)]).long()
        return ids, decoded_logprobs(torch.from_numpy(self.codes[a:b].copy()))

    def save(self, path: Path, meta: dict[str, str]) -> None:
        def packed(array: np.ndarray) -> torch.Tensor:
            return torch.frombuffer(bytearray(lzma.compress(np.ascontiguousarray(array).tobytes())), dtype=torch.uint8)

        tensors = {"codebook": torch.from_numpy(self.codebook), "ids": packed(self.ids), "codes": packed(self.codes),
                   "offsets": self.offsets}
        shape = {"format": FORMAT, "k": str(self.k), "rows": str(self.tokens), "id_dtype": self.ids.dtype.name}
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        try:
            with writing(path):
                save_file(tensors, str(tmp), metadata={**meta, **shape})
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)

    @staticmethod
    def metadata(path: Path) -> dict[str, str]:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}

    @classmethod
    def load(cls, path: Path) -> tuple[TopKStore, dict[str, str]]:
        """The store and its metadata; a ValueError for a file in another format."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: format {meta.get('format', 'int32 ids + float16 logprobs')}, not {FORMAT}")
            n, k = int(meta["rows"]), int(meta["k"])

            def unpacked(name: str, dtype: str, width: int) -> np.ndarray:
                raw = lzma.decompress(f.get_tensor(name).numpy().tobytes())
                return np.frombuffer(raw, dtype=dtype).reshape(n, width)

            store = cls(f.get_tensor("codebook").numpy(), unpacked("ids", meta["id_dtype"], k),
                        unpacked("codes", "uint8", k - 1), f.get_tensor("offsets"))
        return store, meta
