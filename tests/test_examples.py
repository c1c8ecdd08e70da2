"""The example configs in configs/examples/: each is a complete config the validator accepts, its
data loads within its limits, and the real models it names have the shapes its values assume.

No weights and no hub here: each model's published config.json is copied into
tests/data/hf-configs/<hub id>/config.json and its architecture is built on the meta device
(every shape and parameter count, not one byte of weights). What needs the models' own files
(tokenizers, chat templates) runs only where they are in the local Hugging Face cache (HF_HOME)
and is skipped elsewhere, saying so.

The memory figures written in the examples' comments are arithmetic from these shapes; the last
tests recompute them, so a comment cannot drift from the config it describes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distill.config import RunConfig, load_config
from distill.device import placement
from distill.errors import ConfigError
from distill.modeling import prepare_student, student_dtype
from distill.problems import problem_set
from distill.prompts import build_prompt, fill
from tests.conftest import ROOT

# The examples written for GPUs and hub models; smollm2-selfdistill-cpu.yaml runs here, in full
# (tests/test_real_model.py).
EXAMPLES = sorted((ROOT / "configs" / "examples").glob("qwen-*.yaml"))
EXPECTED = {"qwen-math-7b-to-1.5b-sft-lora", "qwen-math-7b-to-1.5b-topk-kd", "qwen-math-7b-to-1.5b-undo"}
HF_CONFIGS = Path(__file__).parent / "data" / "hf-configs"
# Parameters of the published checkpoints (7.62B and 1.54B on the model cards).
PARAMETERS = {"Qwen/Qwen2.5-Math-7B-Instruct": 7_615_616_512, "Qwen/Qwen2.5-1.5B": 1_543_714_304}
# Tokens allowed for the chat template's wrapping (role markers, a default system line) in the
# context budgets; checked against the real templates where they are cached.
CHAT_MARGIN = 128
GB = 1e9

ids = [p.stem for p in EXAMPLES]


def model_ids(cfg: RunConfig) -> dict[str, str]:
    return {"teacher": cfg.models.teacher, "student": cfg.models.student}


def hf_config(hub_id: str) -> dict:
    path = HF_CONFIGS / hub_id / "config.json"
    assert path.exists(), f"{hub_id}: no published config.json in {HF_CONFIGS} (add it to build the architecture)"
    return json.loads(path.read_text())


def meta_model(hub_id: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(HF_CONFIGS / hub_id)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def runs_undo(cfg: RunConfig) -> bool:
    """An example meant for `--undo`: its probe split is set (the driver refuses UNDO otherwise)."""
    return getattr(cfg.data, cfg.undo.probe_split) is not None


def kv_bytes_per_token(c: dict, dtype_bytes: int = 2) -> int:
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * 2 * dtype_bytes


def made_files(path: Path, tmp_path: Path) -> dict[str, str]:
    """Data files an example asks you to make (a `#   <command> > <file>` comment): made with
    that command in a scratch copy of the project's data directory. Split -> the made file."""
    cfg = load_config(path)
    text = path.read_text()
    made: dict[str, str] = {}
    for split in ("train", "validation", "test"):
        source = getattr(cfg.data, split)
        if source is None or ":" in source or (ROOT / source).exists():
            continue
        command = re.search(rf"^#[ \t]+(.+>[ \t]*{re.escape(source)})[ \t]*$", text, re.M)
        assert command, f"{path.name}: data.{split} {source} does not exist and no comment says how to make it"
        work = tmp_path / "project"
        (work / "data").mkdir(parents=True, exist_ok=True)
        if not (work / "data" / "benchmarks").exists():
            (work / "data" / "benchmarks").symlink_to(ROOT / "data" / "benchmarks")
        subprocess.run(["bash", "-c", command.group(1)], cwd=work, check=True)
        made[split] = str(work / source)
    return made


class NoDuplicates(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise AssertionError(f"line {node.start_mark.line + 1}: {repeated[0]!r} given twice in one mapping")
        return super().construct_mapping(node, deep=deep)


# -- the validator ------------------------------------------------------------------------------


def test_the_examples_are_there():
    assert set(ids) >= EXPECTED


@pytest.mark.parametrize("path", EXAMPLES, ids=ids)
def test_an_example_is_a_complete_valid_config(path):
    """Every key is one the schema knows and every value passes the checks the driver runs
    before submitting (`load_config`); the run is named after its file."""
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.generation.backend == "vllm" and cfg.eval.backend == "vllm"
    for role, hub_id in model_ids(cfg).items():
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", hub_id), f"models.{role}: {hub_id!r} is not a hub id"
        hf_config(hub_id)
    # The validator keeps the last of two equal keys (YAML's rule); an example holds each once.
    yaml.load(path.read_text(), Loader=NoDuplicates)


@pytest.mark.parametrize("path", EXAMPLES, ids=ids)
def test_templates_keep_their_backslashes(path):
    """`\\boxed{}` reaches the model as written (in YAML double quotes a lone `\\b` is a
    backspace), and UNDO templates carry every slot."""
    cfg = load_config(path)
    templates = {"prompt.template": cfg.prompt.template}
    if runs_undo(cfg):
        templates["undo.template"] = cfg.undo.template
        for slot in ("{question}", "{previous}", "{student_answer}", "{verdict}"):
            assert slot in cfg.undo.template, f"undo.template lacks {slot}"
    for key, text in templates.items():
        assert "\\boxed{}" in text, key
        assert not re.search(r"[\x00-\x09\x0b-\x1f]", text), f"{key}: a control character: {text!r}"


@pytest.mark.parametrize("path", EXAMPLES, ids=ids)
def test_run_root_is_a_literal_path(path):
    """Nothing expands `~`, `$VAR` or a `<placeholder>` in run_root: each would become a
    directory of that name."""
    run_root = load_config(path).run_root
    assert not re.search(r"[~$<>{}]", run_root), run_root


# -- the data ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=ids)
def test_every_split_loads_within_its_question_limit(path, tmp_path):
    """The splits a run reads (train, the held-out split, the UNDO probe split) load as the jobs
    load them, and every question's UTF-8 bytes, an upper bound on its tokens under a
    byte-level tokenizer, fit data.max_question_chars, which the context budgets below use."""
    made = made_files(path, tmp_path)
    cfg = load_config(path, [f"data.{split}={file}" for split, file in made.items()])
    splits = {"train": cfg.data.train_limit, cfg.eval.split: cfg.eval.limit}
    if runs_undo(cfg):
        splits[cfg.undo.probe_split] = cfg.undo.probe_limit
    loaded = {split: problem_set(cfg.data, split, limit) for split, limit in splits.items()}
    for split, found in loaded.items():
        assert not found.too_long, f"data.{split}: {found.too_long[:1]} over data.max_question_chars"
        longest = max(len(p["question"].encode()) for p in found.problems)
        assert longest <= cfg.data.max_question_chars, (split, longest)
    if runs_undo(cfg):
        train = {p["question"] for p in loaded["train"].problems}
        probe = {p["question"] for p in loaded[cfg.undo.probe_split].problems}
        assert not train & probe, "the probe split shares problems with the training split"
        assert len(train) == cfg.data.train_limit and len(probe) == 1000


@pytest.mark.parametrize("path", EXAMPLES, ids=ids)
def test_prompts_and_answers_fit_the_models_contexts(path):
    """Teacher prompts and the answers that follow them stay inside the teacher's context
    (Qwen2.5-Math: 4096 tokens), counting every character of the fixed text as a token, a
    question at data.max_question_chars, and for UNDO prompts a previous rationale and a student
    answer at their token limits."""
    cfg = load_config(path)
    teacher, student = (hf_config(h)["max_position_embeddings"] for h in model_ids(cfg).values())
    plain = CHAT_MARGIN + len(fill(cfg.prompt.template, question="")) + cfg.data.max_question_chars
    assert plain + cfg.generation.max_new_tokens <= teacher
    assert plain + cfg.eval.max_new_tokens <= min(teacher, student)
    assert cfg.train.max_length <= student
    if runs_undo(cfg):
        fixed = len(fill(cfg.undo.template, question="", previous="", student_answer="", verdict="wrong"))
        undo = (CHAT_MARGIN + fixed + cfg.data.max_question_chars + cfg.generation.max_new_tokens
                + cfg.eval.max_new_tokens)
        assert undo + cfg.generation.max_new_tokens <= teacher, (undo, cfg.generation.max_new_tokens, teacher)


# -- the models, on the meta device -------------------------------------------------------------


@pytest.mark.parametrize("hub_id", list(PARAMETERS))
def test_published_architectures_have_their_published_sizes(hub_id):
    c = hf_config(hub_id)
    model = meta_model(hub_id, torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[hub_id]
    assert model.get_output_embeddings().weight.shape == (c["vocab_size"], c["hidden_size"])
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == c["tie_word_embeddings"]


@pytest.mark.parametrize("path", EXAMPLES, ids=ids)
def test_the_student_takes_the_examples_training_setup(path):
    """The train stage's setup of the student, on its real shape: every LoRA target module
    exists (peft refuses a name it cannot find) and carries r·(in + out) trainable weights in
    float32 over a frozen base in the compute dtype; a full fine-tune trains every weight."""
    cfg = load_config(path)
    place = placement(cfg.train.precision, "meta")
    base = meta_model(cfg.models.student, student_dtype(cfg.train, place))
    lora = cfg.train.lora
    linears = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    if lora.enabled:
        for target in lora.target_modules:
            assert any(n.split(".")[-1] == target for n in linears), (
                f"train.lora.target_modules: {target} not in {cfg.models.student}")
        expected = sum(lora.r * (m.in_features + m.out_features) for n, m in linears.items()
                       if n.split(".")[-1] in lora.target_modules)
    else:
        expected = PARAMETERS[cfg.models.student]
    model = prepare_student(base, cfg.train)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    if lora.enabled:
        assert {n.split(".")[-4] for n in trainable} == set(lora.target_modules)
        assert {p.dtype for p in model.parameters() if not p.requires_grad} == {place.dtype}


@pytest.mark.parametrize("path", EXAMPLES, ids=ids)
def test_distillation_needs_fit_the_pair(path):
    """Logit distillation reads the teacher's rows at the student's token ids: the teacher's
    head has at least the student's rows (152064 vs 151936 for this pair), and an offline top-k
    is far below the vocabulary."""
    cfg = load_config(path)
    if cfg.train.objective == "sft":
        pytest.skip("sft: no teacher at training time")
    teacher, student = (hf_config(h) for h in model_ids(cfg).values())
    assert teacher["vocab_size"] >= student["vocab_size"]
    assert cfg.train.kd.top_k < student["vocab_size"]


def test_memory_figures_in_the_comments_follow_from_the_shapes():
    """The sizes the examples' comments give, recomputed from the shapes and the examples'
    values (decimal GB)."""
    teacher, student = hf_config("Qwen/Qwen2.5-Math-7B-Instruct"), hf_config("Qwen/Qwen2.5-1.5B")
    t_params, s_params = PARAMETERS["Qwen/Qwen2.5-Math-7B-Instruct"], PARAMETERS["Qwen/Qwen2.5-1.5B"]
    sft = load_config(ROOT / "configs" / "examples" / "qwen-math-7b-to-1.5b-sft-lora.yaml")
    kd = load_config(ROOT / "configs" / "examples" / "qwen-math-7b-to-1.5b-topk-kd.yaml")
    context = teacher["max_position_embeddings"]
    assert round(t_params * 2 / GB, 1) == 15.2                               # teacher weights in bf16
    assert kv_bytes_per_token(teacher) == 56 * 1024                          # KV cache per token
    assert sft.generation.batch_size == 64 and context == 4096               # 64 sequences x 4096 tokens:
    assert round(64 * context * kv_bytes_per_token(teacher) / GB) == 15      # 15 GB of KV cache
    assert round(s_params * 2 / GB, 1) == 3.1                                # student in bf16 (model, LoRA base)
    assert not kd.train.lora.enabled
    assert round(s_params * 16 / GB, 1) == 24.7                              # full fine-tune: weights, grads, AdamW
    assert round(s_params * 12 / GB, 1) == 18.5                              # a full fine-tune checkpoint
    for train in (sft.train, kd.train):                                      # one layer's input, batch 8 x 2048
        assert (train.batch_size, train.grad_accum, train.max_length, train.loss_chunk) == (8, 4, 2048, 256)
    activations = 8 * 2048 * student["hidden_size"] * 2
    assert round(activations / 1e6) == 50 and round(activations * student["num_hidden_layers"] / GB, 1) == 1.4
    assert round(256 * student["vocab_size"] * 4 / GB, 2) == 0.16            # one loss chunk in float32
    model = prepare_student(meta_model("Qwen/Qwen2.5-1.5B", torch.bfloat16), sft.train)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert round(adapters * 16 / GB, 1) == 0.3                               # adapters + grads + AdamW, float32
    assert kd.train.kd.top_k == 64 and 6 * 64 == 384                         # top-64 store: bytes per token


# -- broken copies are refused ------------------------------------------------------------------


def broken_copy(path: Path, tmp_path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text
    broken = tmp_path / path.name
    broken.write_text(text.replace(old, new, 1))
    return broken


@pytest.mark.parametrize("path", EXAMPLES, ids=ids)
@pytest.mark.parametrize(("old", "new", "key"), [
    ("\n  max_new_tokens:", "\n  max_new_token:", "generation.max_new_token"),
    ("\n  lora:\n    enabled:", "\n  lora:\n    enable:", "train.lora.enable"),
    ("\nrun_root:", "\nrun_rot:", "run_rot"),
])
def test_a_typo_in_an_example_is_refused_in_one_line_naming_the_key(path, tmp_path, old, new, key):
    if old not in path.read_text():
        pytest.skip(f"{path.name} has no {old.strip()!r}")
    broken = broken_copy(path, tmp_path, old, new)
    with pytest.raises(ConfigError) as exc:
        load_config(broken)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"{broken}: {key}: unknown key (expected one of: ")


def test_the_driver_refuses_a_broken_example_before_anything_exists(tmp_path):
    """Through the command a user runs: exit status 2, one line on stderr naming the key path,
    and no run directory."""
    path = ROOT / "configs" / "examples" / "qwen-math-7b-to-1.5b-sft-lora.yaml"
    broken = broken_copy(path, tmp_path, "\n  temperature: 0.0", "\n  temperature: greedy")
    proc = subprocess.run([sys.executable, "-m", "jobs.driver", "--config", str(broken), "--executor", "local"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"error: {broken}: generation.temperature: expected float, got 'greedy'"]
    assert not (tmp_path / "runs").exists()


# -- with the models' own files (where they are cached) -----------------------------------------


def cached_tokenizer(hub_id: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hub_id, local_files_only=True)
    except OSError:
        pytest.skip(f"needs {hub_id}'s tokenizer files, which are not in the local Hugging Face cache (HF_HOME) "
                    "and cannot be downloaded here")


@pytest.mark.parametrize("hub_id", list(PARAMETERS))
def test_the_fixture_is_the_published_config(hub_id):
    """Where the real config.json is cached, the copy in tests/data/hf-configs matches it."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(hub_id, "config.json")
    if not isinstance(cached, str):
        pytest.skip(f"needs {hub_id}'s config.json, which is not in the local Hugging Face cache (HF_HOME)")
    published = json.loads(Path(cached).read_text())
    fixture = hf_config(hub_id)
    assert {k: published.get(k) for k in fixture} == fixture


@pytest.mark.parametrize("path", EXAMPLES, ids=ids)
def test_the_real_tokenizers_fit_the_examples_assumptions(path):
    """Where both tokenizers are cached: the student's vocabulary is the teacher's or an
    id-preserving prefix of it (what KD checks before its first step), and each chat template
    wraps a prompt in at most CHAT_MARGIN tokens."""
    from distill.distillation import vocabulary_relation

    cfg = load_config(path)
    tokenizers = {role: cached_tokenizer(h) for role, h in model_ids(cfg).items()}
    assert vocabulary_relation(tokenizers["student"], tokenizers["teacher"]) != "different"
    for tokenizer in tokenizers.values():
        plain = fill(cfg.prompt.template, question="What is 2 + 3?")
        wrapped = build_prompt(tokenizer, cfg.prompt, "What is 2 + 3?")
        extra = (len(tokenizer(wrapped, add_special_tokens=False)["input_ids"])
                 - len(tokenizer(plain, add_special_tokens=False)["input_ids"]))
        assert extra <= CHAT_MARGIN

