"""The student's own samples for on-policy distillation from a vLLM engine whose weights follow
the student's (`train.onpolicy.sampler: vllm`).

The engine runs inside the training process (vLLM's in-process engine core, so no weights cross
a process boundary) and is built on the first sampled micro-batch from the student's starting
checkpoint. Before each step's first sample the student's current weights are pushed into it in
place with vLLM's `reload_weights`, which re-runs what the engine does after loading a
checkpoint (on CPUs it repacks each matrix for oneDNN); LoRA adapters are merged into their base
weights on the way, out of place, so the trained model is left as it was. Each prompt is sampled
under its own seed and a micro-batch's prompts in one call, so a resumed run, which rebuilds the
engine from the checkpoint's weights, samples what the uninterrupted one did.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from distill.errors import DistillError

if TYPE_CHECKING:
    import torch


def hf_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The student's weights under its checkpoint's names (what vLLM's loader reads): a PEFT
    model's LoRA layers merged into their base weights, its adapters left out."""
    import torch
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lora = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        for key, tensor in base.state_dict().items():
            if ".lora_" in key:
                continue
            name = key.replace(".base_layer.", ".")
            owner = lora.get(name.rsplit(".", 1)[0])
            if owner is not None and name.endswith(".weight"):
                tensor = tensor + sum(owner.get_delta_weight(a).to(tensor.dtype) for a in owner.active_adapters
                                      if a in owner.lora_A)
            yield name, tensor


class VLLMSampler:
    """A vLLM engine holding a copy of the student, synced once per optimizer step."""

    def __init__(self, model: torch.nn.Module, precision: str, kv_cache_gib: float) -> None:
        from distill.generation import Engine, VLLMBackend

        if importlib.util.find_spec("vllm") is None:
            raise DistillError("train.onpolicy.sampler: vllm is not installed in this environment "
                               "(make venv-vllm builds one that has it), or use sampler: transformers")
        path = model.get_base_model().config.name_or_path if hasattr(model, "get_base_model") else \
            model.config.name_or_path
        # The engine core in this process, this engine only: the variable is read when an engine is
        # built, and other engines of the process (generation, evaluation) keep their own processes.
        before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            self.backend = VLLMBackend(path, Engine(backend="vllm", dtype=precision, kv_cache_gib=kv_cache_gib))
        finally:
            if before is None:
                os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
            else:
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = before
        self.synced_step: int | None = None
        self.push_s = 0.0  # seconds spent pushing weights, for the log
        # Each push logs two INFO lines and warns that rotary embeddings (which no checkpoint
        # holds) were not loaded: once per optimizer step, that buries the training log.
        for name in ("vllm.model_executor.model_loader.reload", "vllm.v1.core.block_pool"):
            logging.getLogger(name).setLevel(logging.ERROR)
        weakref.finalize(self, self.backend.close)  # the engine goes with the trainer that holds it

    def sync(self, model: torch.nn.Module, step: int) -> None:
        """The engine's weights made the student's, once per optimizer step."""
        import time

        if self.synced_step == step:
            return
        start = time.perf_counter()
        self.backend.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": hf_weights(model)})
        self.backend.llm.reset_prefix_cache()  # cached prompt blocks hold the old weights' keys and values
        self.push_s += time.perf_counter() - start
        self.synced_step = step

    def sample(self, prompts: list[list[int]], seeds: list[int], max_new_tokens: list[int], temperature: float,
               eos_token_id: int) -> list[list[int]]:
        """One completion per prompt, each under its own seed, ending at `eos_token_id` (kept)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=1, temperature=temperature, top_p=1.0, top_k=-1, max_tokens=room, seed=seed,
                                 stop_token_ids=[eos_token_id], ignore_eos=False)
                  for seed, room in zip(seeds, max_new_tokens, strict=True)]
        outs = self.backend.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outs]
