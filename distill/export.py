"""`distill export`: an iteration's verified rationales and student as folders a hub takes.

The dataset is one parquet file `datasets.load_dataset("parquet", ...)` reads, with a dataset
card; the model is the run's saved student folder (`from_pretrained` and vLLM load it) with a
model card. Every number on a card comes from the run's manifest and files, and every exported
file is checked against the hash its stage recorded first. Publishing is the hub's own command
(`hf upload`); nothing here uses the network.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path
from typing import Any

import yaml

from distill.config import RunConfig, load_config
from distill.errors import DistillError
from distill.evaluation import BASELINE_EVALUATE, EVALUATE
from distill.integrity import verify
from distill.jsonl import atomic_write_text, read_jsonl
from distill.layout import RunPaths
from distill.manifest import Manifest
from distill.rationales import VERIFY
from distill.records import ModelResult, StageRecord
from distill.stage import Stage
from distill.student import TRAIN


def recorded_path(manifest: dict[str, Any], run: Path, stage: Stage, name: str, it: int) -> Path:
    """The file stage `stage` recorded as `name` in iteration `it`, once its hash checks out."""
    item = stage.output(name, it)
    if verify(manifest, run, item) is None:
        raise DistillError(f"{run}: iteration {it} has no {item.describe()} yet (`python -m distill status` "
                           "shows what is done)")
    return run / StageRecord.of(manifest, it, stage.name).artifacts[name].path


def source_license(data_file: str | None) -> str:
    """The license of the problems: the `<name>.LICENSE` file beside a benchmark file (MIT for
    GSM8K, MATH-500, SVAMP), else `other` (the card names the file)."""
    if not data_file:
        return "other"
    path = Path(data_file)
    beside = path.with_name(path.name.split("_")[0].split(".")[0] + ".LICENSE")
    if beside.exists() and beside.read_text().lstrip().startswith("MIT License"):
        return "mit"
    return "other"


def front_matter(fields: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(fields, sort_keys=False) + "---\n"


def token_line(records: list[dict[str, Any]]) -> str:
    tokens = [r["n_tokens"] for r in records if isinstance(r.get("n_tokens"), int)]
    if not tokens:
        return "not recorded"
    return f"mean {statistics.mean(tokens):.1f}, median {statistics.median(tokens):g}, max {max(tokens)}"


def dataset_card(cfg: RunConfig, it: int, records: list[dict[str, Any]], metrics: dict[str, Any]) -> str:
    license_id = source_license(cfg.data.train)
    problems = len({r.get("problem_id") for r in records})
    template = "the error-conditioned UNDO prompt (`undo.template`)" if it > 0 else "`prompt.template`"
    return front_matter({
        "license": license_id, "task_categories": ["text-generation"], "tags": ["math", "distillation", "undo"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
    }) + f"""
# {cfg.name}: verified rationales, iteration {it}

Rationales written by the teacher `{cfg.models.teacher}` for math word problems, kept only
where the final answer matches the gold one (math-verify, strict rule: boxed answer, `####`
line or answer phrase). Made with distill (UNDO iteration {it}: {template}).

| | |
|---|---|
| rationales | {len(records)} |
| problems covered | {problems} |
| problems the teacher did not solve | {metrics.get('problems_unsolved', '-')} |
| samples per problem | {cfg.undo.n if it > 0 else cfg.generation.n} |
| sampling | temperature {cfg.undo.temperature if it > 0 else cfg.generation.temperature}, \
top_p {cfg.generation.top_p}, at most {cfg.generation.max_new_tokens} new tokens, seed {cfg.generation.seed} |
| response tokens | {token_line(records)} |
| source problems | `{cfg.data.train}` (license: {license_id}) |

Fields: `question`, `gold` (the reference answer), `response` (the teacher's rationale),
`problem_id`, `correct` (always true here) and `n_tokens`. The teacher's own license terms on
its outputs apply.
"""


def export_data(run: Path, it: int, out: Path) -> Path:
    """Iteration `it`'s verified.jsonl as `out/data/train-00000-of-00001.parquet` and `out/README.md`."""
    from datasets import Dataset

    manifest, cfg = Manifest(run).read(), load_config(RunPaths(run).config)
    records = read_jsonl(recorded_path(manifest, run, VERIFY, "verified", it))
    if not records:
        raise DistillError(f"{run}: iteration {it} verified no rationales; nothing to export")
    (out / "data").mkdir(parents=True, exist_ok=True)
    Dataset.from_list(records).to_parquet(str(out / "data" / "train-00000-of-00001.parquet"))
    atomic_write_text(out / "README.md", dataset_card(cfg, it, records, StageRecord.of(manifest, it,
                                                                                       VERIFY.name).metrics))
    return out


def accuracy_rows(manifest: dict[str, Any], it: int) -> str:
    """Markdown rows: the student of `it`, the one-shot student at its steps, the untrained
    student and the teacher, as measured."""
    rows = []
    for stage, label, name, at in ((EVALUATE, "student", "this model", it),
                                   (BASELINE_EVALUATE, "oneshot", "one-shot student at the same steps", it),
                                   (EVALUATE, "base", "the untrained student", 0),
                                   (EVALUATE, "teacher", "the teacher", 0)):
        res: ModelResult | None = StageRecord.of(manifest, at, stage.name).result(label)
        if res is not None:
            flexible = "-" if res.flexible_accuracy is None else f"{100 * res.flexible_accuracy:.1f}%"
            rows.append(f"| {name} | {100 * res.accuracy:.1f}% | {flexible} | {res.details.get('n', '-')} | "
                        f"{res.tokens_mean:.1f} |")
    return "\n".join(rows)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "-" if value is None else str(value)


def model_card(cfg: RunConfig, it: int, manifest: dict[str, Any]) -> str:
    train = StageRecord.of(manifest, it, TRAIN.name).metrics
    t = cfg.train
    kd = f", kd {t.kd.loss} (alpha {t.kd.alpha}, T {t.kd.temperature})" if t.objective != "sft" else ""
    lora = f", LoRA r {t.lora.r} alpha {t.lora.alpha} on {', '.join(t.lora.target_modules)}" if t.lora.enabled else ""
    hub_id = cfg.models.student.count("/") == 1 and not Path(cfg.models.student).exists()
    return front_matter({
        **({"base_model": cfg.models.student} if hub_id else {}), "library_name": "transformers", "license": "other",
        "tags": ["math", "distillation", "undo", f"objective-{t.objective}"], "pipeline_tag": "text-generation",
    }) + f"""
# {cfg.name}: student of iteration {it}

`{cfg.models.student}` distilled from the teacher `{cfg.models.teacher}` with distill
(UNDO iteration {it}), on {train.get('examples', '-')} training examples: the teacher's rationales for
`{cfg.data.train}` verified in iterations {'0' if it == 0 else f'0..{it}'} (`undo.dataset: {cfg.undo.dataset}`).

Training: objective `{t.objective}`{kd}{lora}; {train.get('step', '-')} optimizer steps this
iteration, batch {t.batch_size} x {t.grad_accum} accumulation, lr {t.lr} ({t.lr_scheduler}, warm-up
{t.warmup_ratio}), max length {t.max_length}, seed {t.seed}, final loss {_number(train.get('loss'))}.

Measured by the run on the `{cfg.eval.split}` split of `{getattr(cfg.data, cfg.eval.split)}` (greedy, at most
{cfg.eval.max_new_tokens} new tokens; strict: boxed answer, `####` line or answer phrase; flexible: also the
last number), one run at training seed {t.seed}:

| model | accuracy | flexible | problems | mean response tokens |
|---|---|---|---|---|
{accuracy_rows(manifest, it)}

The licenses of the base model, the teacher (on its outputs) and the training problems apply.
"""


def export_model(run: Path, it: int, out: Path) -> Path:
    """Iteration `it`'s student folder, copied to `out` with a `README.md` model card."""
    manifest, cfg = Manifest(run).read(), load_config(RunPaths(run).config)
    model = recorded_path(manifest, run, TRAIN, "model", it)
    shutil.copytree(model, out, dirs_exist_ok=True)
    atomic_write_text(out / "README.md", model_card(cfg, it, manifest))
    return out


def export(run: Path, it: int, what: str, out: Path) -> list[Path]:
    """`what` (data, model or both) of iteration `it`; both go to `out/data` and `out/model`."""
    if what == "data":
        return [export_data(run, it, out)]
    if what == "model":
        return [export_model(run, it, out)]
    return [export_data(run, it, out / "data"), export_model(run, it, out / "model")]
