"""`python -m distill <command>`: the library's command line (no SLURM here; see `jobs`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distill.errors import DistillError
from distill.interrupts import run_command
from distill.typed_yaml import at_least


def run_dir(args: argparse.Namespace) -> Path:
    """The run a command reads: `--run DIR`, else the run of `--config` under its `name:` (or
    `--name`), the same directory `make iter` with that CONFIG= and RUN= writes."""
    from distill.layout import RunPaths

    if args.run is not None:
        path, start = args.run, ""
    else:
        from distill.config import load_config

        path = load_config(args.config, [f"name={args.name}"] if args.name else []).run_dir
        start = f" (start it: `make iter CONFIG={args.config}{f' RUN={args.name}' if args.name else ''}`)"
    if not RunPaths(path).manifest.exists():
        raise DistillError(f"{RunPaths(path).manifest}: no manifest: this run has not started{start}")
    return path


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, help="run directory, e.g. runs/tiny (default: from --config)")
    p.add_argument("--config", default="configs/tiny.yaml", help="config whose run to read (default: %(default)s)")
    p.add_argument("--name", help="run name, when it differs from the config's (make's RUN=)")


def cmd_status(args: argparse.Namespace) -> None:
    from distill import pipeline
    from distill.manifest import Manifest, format_table

    args.run = run_dir(args)
    data = Manifest(args.run).read()
    print(json.dumps(data, indent=2) if args.json
          else f"run {data.get('run', args.run)}  config {data.get('config_hash')}\n"
          + format_table(data, pipeline.names(), Path(args.run)))


def cmd_grade(args: argparse.Namespace) -> None:
    from distill.grading import grade_file

    summary = grade_file(args.input, args.output, gold_field=args.gold_field, response_field=args.response_field,
                         workers=args.workers)
    print(f"{summary['correct']}/{summary['n']} correct (accuracy {summary['accuracy']:.4f}) -> {args.output}")


def cmd_report(args: argparse.Namespace) -> None:
    from distill.report import write_report

    path, table = write_report(run_dir(args))
    print(table)
    print(f"-> {path} (+ report.json, report.png)")


def cmd_eval(args: argparse.Namespace) -> None:
    from distill.config import DataConfig, PromptConfig
    from distill.evaluation import EvalSettings, parse_models, run_eval
    from distill.generation import Engine

    if (args.bench is None) == (args.data is None):
        raise DistillError("eval: give exactly one of --bench NAME or --data PATH")
    source = args.bench or str(args.data)
    from distill.typed_yaml import parse_overrides

    kwargs = dict(parse_overrides(args.chat_template_arg or [], "--chat-template-arg"))
    prompt = PromptConfig(use_chat_template=not args.no_chat_template, chat_template_kwargs=kwargs)
    if args.template:
        prompt.template = args.template
    if "{question}" not in prompt.template:
        raise DistillError("--template: must contain the {question} slot")
    data = DataConfig(test=None, question_field=args.prompt_col, answer_field=args.answer_col, id_field=args.id_col,
                      format=args.format, meta_fields=args.meta_col or [])
    settings = EvalSettings(source=source, limit=args.limit, max_new_tokens=args.max_new_tokens,
                            num_shards=args.num_shards, backend=args.backend, prompt=prompt, data=data)
    engine = Engine(backend=args.backend, tensor_parallel_size=args.tensor_parallel_size,
                    attn_implementation=args.attn_implementation, dtype=args.dtype, kv_cache_gib=args.kv_cache_gib)
    out = args.out or Path("runs") / f"eval-{Path(source).stem.replace(':', '-')}"
    summaries = run_eval(settings, parse_models(args.model), out, shards=args.shard, batch_size=args.batch_size,
                         engine=engine, workers=args.workers, progress=not args.quiet)
    if summaries is None:
        print(f"shard(s) {args.shard} done -> {out}; run again without --shard to merge and report")
        return
    from distill.efficiency import comparison_table

    print(comparison_table(summaries))
    print(f"-> {out / 'tokens.md'} (+ tokens.json, tokens.png, <model>/graded.jsonl, <model>/metrics.json)")


def cmd_compare(args: argparse.Namespace) -> None:
    from distill.compare import compare

    names = [n.strip() for n in args.objectives.split(",") if n.strip()]
    print(compare(args.config, names, args.set, args.steps, progress=not args.quiet, seeds=args.seeds))


def cmd_tokens(args: argparse.Namespace) -> None:
    from distill.efficiency import write_token_report
    from distill.jsonl import read_jsonl
    from distill.layout import RunPaths

    paths = RunPaths(args.run)
    evaluated = paths.eval(args.iter, 1)  # the merged files do not depend on the shard count
    found = evaluated.merged_labels()
    if not found:
        raise DistillError(f"{evaluated.root}: no evaluated model yet (eval/<model>/graded.jsonl)")
    order = [lb for lb in ("teacher", "base", "student") if lb in found] + [lb for lb in found if lb not in
                                                                          ("teacher", "base", "student")]
    records = {lb: read_jsonl(evaluated.graded(lb)) for lb in order}
    path, table = write_token_report(records, paths.iteration(args.iter), f"{paths.root.name} iteration {args.iter}")
    print(table)
    print(f"-> {path} (+ tokens.json, tokens.png)")


def cmd_repair(args: argparse.Namespace) -> None:
    from distill.repair import repair

    for it, stage, state in repair(args.run):
        print(f"iter {it} {stage}: {state}")
    print(f"-> {args.run / 'manifest.json'} rebuilt; `make iter` redoes only what is not done")


def cmd_config_reference(args: argparse.Namespace) -> None:
    from distill.config import RunConfig
    from distill.config_reference import reference, rows

    if not args.key:
        print(reference(), end="")
        return
    found = [r for r in rows(RunConfig) if r[0] == args.key or r[0].startswith(args.key + ".")]
    if not found:
        raise DistillError(f"{args.key}: no such config key (python -m distill config-reference lists them)")
    for key, tp, default, allowed, text in found:
        print(f"{key}: {tp}{f', default {default}' if default else ''}{f', {allowed}' if allowed else ''}\n  {text}")


def cmd_plan(args: argparse.Namespace) -> None:
    from distill import pipeline
    from distill.config import load_config
    from distill.memory import (
        DEFAULT_GPU_GB,
        PLANNED_SECTIONS,
        Gpu,
        format_memory_plan,
        gpu_type,
        memory_plan,
    )
    from distill.stage import BASELINE, FIRST, UNDO

    cfg = load_config(args.config, args.set)
    sections = PLANNED_SECTIONS
    gpus = {s: Gpu("GPU", DEFAULT_GPU_GB, source="no --cluster: assumed") for s in sections}
    world, notes = None, []
    if args.cluster:
        from jobs.cluster import load_profile, profile_world, section_gpus  # the one reader of profiles

        profile = load_profile(args.cluster, filled=False)
        found, notes = section_gpus(profile, sections)
        gpus = {s: g or Gpu("GPU", DEFAULT_GPU_GB, 1, profile.source) for s, g in found.items()}
        world = profile_world(profile)
    if args.gpu:
        gb, note = gpu_type(args.gpu)
        gpus = {s: Gpu(args.gpu, gb, g.count, "--gpu") for s, g in gpus.items()}
        notes = [note] if note else []
    result = memory_plan(cfg, gpus, world_size=args.world_size or world or 1, strategy=args.strategy)
    result["notes"] = notes
    result["plans"] = {kind: [s.name for s in pipeline.kind_plan(kind, cfg)] for kind in (FIRST, UNDO, BASELINE)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("stages:\n" + "\n".join(f"  {line}" for line in pipeline.plan_lines(cfg)) + "\n")
    print(format_memory_plan(result))
    for note in notes:
        print(f"note: {note}")


def cmd_gpu_check(args: argparse.Namespace) -> int:
    from distill.gpucheck import main

    names = [n.strip() for n in args.objectives.split(",") if n.strip()] if args.objectives else None
    return main(args.out, names)


def cmd_export(args: argparse.Namespace) -> None:
    from distill.export import export

    for path in export(run_dir(args), args.iter, args.what, args.out):
        print(f"wrote {path} (publish: hf upload <user>/<name> {path}"
              f"{' --repo-type dataset' if (path / 'data').is_dir() and not (path / 'config.json').exists() else ''})")


def cmd_doctor(args: argparse.Namespace) -> int:
    from distill.config import load_config
    from distill.doctor import BLOCKS, checks
    from jobs.executors import slurm_checks  # SLURM's side lives with the launchers

    cfg = load_config(args.config, args.set) if args.config else None
    lines = checks(cfg) + slurm_checks(args.cluster)
    print("\n".join(str(c) for c in lines))
    blocking = sum(c.mark == BLOCKS for c in lines)
    print(f"{blocking} blocking problem(s)" if blocking else "nothing blocking")
    return 1 if blocking else 0


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="print a run's manifest as a table, with the progress of running units")
    add_run_arguments(p)
    p.add_argument("--json", action="store_true", help="print the raw manifest")
    p.set_defaults(func=cmd_status)


def _add_grade(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grade", help="grade a JSONL file of responses against gold answers",
                       description="Adds `pred_answer` and `correct` to every record (math-verify equivalence).")
    p.add_argument("--input", required=True, type=Path, help="JSONL with gold and response fields")
    p.add_argument("--output", required=True, type=Path, help="graded JSONL to write")
    p.add_argument("--gold-field", default="gold", help="field holding the gold answer (default: %(default)s)")
    p.add_argument("--response-field", default="response", help="field holding the response (default: %(default)s)")
    p.add_argument("--workers", type=at_least(1), default=None, help="grading processes (default: one per CPU)")
    p.set_defaults(func=cmd_grade)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write report.md/.json/.png for a run from its manifest")
    add_run_arguments(p)
    p.set_defaults(func=cmd_report)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate models on a benchmark or problem file (sharded, resumable), with a token report",
        description="Greedy answers from each --model, graded with math-verify; writes <out>/tokens.md/.json/.png. "
                    "Rerunning resumes; --shard i runs one shard (e.g. as an array task), a run without it merges.")
    src = p.add_argument_group("problems")
    src.add_argument("--bench", help="benchmark: gsm8k, gsm8k:train, math500, svamp (data/benchmarks)")
    src.add_argument("--data", type=Path, help="problem file instead: .jsonl, .json array, .parquet or a datasets dir")
    src.add_argument("--prompt-col", "--prompt_col", default="question",
                     help="question field of --data (default: %(default)s)")
    src.add_argument("--answer-col", "--answer_col", default="answer",
                     help="gold field of --data (default: %(default)s)")
    src.add_argument("--id-col", "--id_col", default="id", help="id field of --data, if present (default: %(default)s)")
    src.add_argument("--meta-col", "--meta_col", action="append",
                     help="field of --data to group the report by (repeatable)")
    src.add_argument("--format", default="auto", choices=["auto", "jsonl", "json", "parquet", "datasets"])
    src.add_argument("--limit", type=at_least(1), help="only the first N problems")
    p.add_argument("--model", action="append", required=True, metavar="[LABEL=]PATH",
                   help="model directory, repeatable: teacher=models/tiny/teacher base=models/tiny/student ...")
    p.add_argument("--out", type=Path, help="output directory (default: runs/eval-<bench>)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=256)
    p.add_argument("--batch-size", type=at_least(1), default=16)
    p.add_argument("--num-shards", type=at_least(1), default=1)
    p.add_argument("--shard", type=at_least(0), action="append", help="run only this shard (repeatable); merge later")
    p.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    p.add_argument("--tensor-parallel-size", type=at_least(1), default=1, help="vLLM only")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="precision of every model "
                        "(default: auto: bf16 on GPUs that have it, fp16 on others, fp32 on CPU)")
    p.add_argument("--kv-cache-gib", type=float, help="vLLM's KV cache in GiB (default: gpu_memory_utilization 0.9 "
                   "on a GPU, 1 GiB on a CPU)")
    p.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                   help="transformers backend only (default: %(default)s)")
    p.add_argument("--template", help="prompt template with a {question} slot (default: the config default)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="plain prompt even if the tokenizer has a chat template")
    p.add_argument("--chat-template-arg", action="append", metavar="KEY=VALUE",
                   help="chat template argument, repeatable, e.g. enable_thinking=false for Qwen3")
    p.add_argument("--workers", type=at_least(1), help="grading processes (default: one per CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)


def _add_tokens(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokens", help="token-efficiency report of a pipeline run's evaluated models")
    p.add_argument("--run", required=True, type=Path, help="run directory, e.g. runs/tiny")
    p.add_argument("--iter", type=at_least(0), default=0, help="iteration whose eval/ to read (default: %(default)s)")
    p.set_defaults(func=cmd_tokens)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    from distill import objectives

    p = sub.add_parser("compare", help="one student per distillation objective at equal steps, evaluated side by side",
                       description="Train one student per objective on iteration 0's verified rationales of the run "
                       "(run `make iter ITER=0` first), at equal steps, and evaluate each on the held-out split. "
                       f"Presets: {', '.join(objectives.presets())}; any objective by its name or module path.")
    p.add_argument("--config", default="configs/tiny.yaml", help="run config (default: %(default)s)")
    p.add_argument("--objectives", default=",".join(objectives.names()),
                   help="comma-separated presets or objectives (default: every objective, %(default)s)")
    p.add_argument("--steps", type=at_least(1),
                   help="optimizer steps per student (default: the config's train.max_steps)")
    p.add_argument("--seeds", type=at_least(0), nargs="+", metavar="SEED",
                   help="train every objective once per train.seed; rows give the mean ± sd and every seed's "
                        "accuracy (e.g. --seeds 0 1 2; default: the config's train.seed, once)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)


def _add_repair(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repair", help="rebuild a run's manifest from the outputs on disk",
                       description="For a manifest that was deleted or damaged: every unit whose outputs are complete "
                       "and sound on disk is recorded done (sharded stages merged again); "
                       "the rest is left for the next "
                       "run. The old manifest is kept as manifest.json.before-repair.")
    p.add_argument("--run", required=True, type=Path, help="run directory, e.g. runs/tiny")
    p.set_defaults(func=cmd_repair)


def _add_config_reference(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config-reference", help="every config key with its type, default, range and help",
                       description="Print docs/config-reference.md as generated from the schema, or the keys "
                       "under KEY (e.g. train.kd).")
    p.add_argument("key", nargs="?", help="a key or section, e.g. train.lr or train.kd")
    p.set_defaults(func=cmd_config_reference)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-GPU memory of each stage of a run, from the models' config.json alone",
                       description="Weights, gradients, optimizer state, activations (gradient checkpointing off and "
                       "on), the loss chunk and the teacher of the training stage, and the weights and KV cache of "
                       "generation and evaluation, from the models' config.json (no weights are loaded; a hub ID "
                       "must be in the Hugging Face cache); a verdict against the GPU the cluster profile's gres "
                       "names (default: 80 GB).")
    p.add_argument("--config", default="configs/tiny.yaml", help="run config (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--cluster", help="cluster profile (name or path) whose stages' gres name the GPUs")
    p.add_argument("--gpu", help="GPU type for every stage instead (H100, H200, A100, a100-40, V100, L40S, ...)")
    p.add_argument("--world-size", type=at_least(1),
                   help="GPUs training runs on (default: the profile's gpus_per_node × nodes if it has them, else 1)")
    p.add_argument("--strategy", default="none", choices=["none", "ddp", "fsdp"],
                   help="none: one GPU; ddp: replicated; fsdp: parameters, gradients and optimizer sharded "
                   "(default: %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output (bytes)")
    p.set_defaults(func=cmd_plan)


def _add_gpu_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gpu-check", help="exercise every GPU path on tiny models built here; a table of what passed",
                       description="Training in the job's precision with a kill and resume, every objective, LoRA and "
                       "QLoRA, the chunked loss at a 151,936-token vocabulary, transformers and vLLM generation "
                       "(tensor parallel with 2+ GPUs). CUDA-only checks are skipped without CUDA. "
                       "Exit status 1 if any failed.")
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"), help="work directory (default: %(default)s)")
    p.add_argument("--objectives", help="comma-separated objectives whose checks to run, by name or module path "
                   "(default: every objective in distill/objectives)")
    p.set_defaults(func=cmd_gpu_check)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="an iteration's verified rationales (parquet + dataset card) and student "
                       "(model folder + model card), ready for `hf upload`",
                       description="Every exported file is checked against the hash its stage recorded; the cards "
                       "hold the run's measured numbers. Nothing is uploaded.")
    add_run_arguments(p)
    p.add_argument("--iter", type=at_least(0), required=True, help="iteration whose data and student to export")
    p.add_argument("--what", choices=["data", "model", "both"], default="both",
                   help="data: the verified rationales; model: the student; both: OUT/data and OUT/model "
                   "(default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="folder to write")
    p.set_defaults(func=cmd_export)


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check this machine for what a first run trips over; one line per check",
                       description="Libraries against the pins, GPUs and bf16, vLLM and bitsandbytes where the config "
                       "uses them, SLURM reachable and the profile accepted (sbatch --test-only), the run root's "
                       "filesystem and whether flock excludes a second process there, free disk against what the run "
                       "writes, the Hugging Face and vLLM cache locations. ✓ fine, ! worth knowing, ✗ blocking; exit "
                       "status 1 only when something blocks.")
    p.add_argument("--config", help="run config whose engines, run root and models to check (default: none)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--cluster", metavar="PROFILE", help="cluster profile (name or path) to try with sbatch --test-only")
    p.set_defaults(func=cmd_doctor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_status, _add_grade, _add_report, _add_eval, _add_tokens, _add_compare, _add_repair,
                _add_config_reference, _add_plan, _add_gpu_check, _add_doctor,
                _add_export):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    def body() -> int | None:
        args = build_parser().parse_args(argv)
        return args.func(args)
    return run_command(body, lambda: "stopped")


if __name__ == "__main__":
    sys.exit(main())
