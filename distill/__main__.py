"""`python -m distill <command>`: the library's command line (no SLURM here; see `jobs`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distill.errors import DistillError


def cmd_status(args: argparse.Namespace) -> None:
    from distill.manifest import Manifest, format_table

    if args.run is None:
        from distill.config import load_config

        args.run = load_config(args.config, [f"name={args.name}"] if args.name else []).run_dir
    manifest = Manifest(args.run)
    if not manifest.path.exists():
        raise DistillError(f"{manifest.path}: no manifest (has this run started?)")
    data = manifest.read()
    print(json.dumps(data, indent=2) if args.json else f"run {data.get('run', args.run)}  config {data.get('config_hash')}\n"
          + format_table(data))


def cmd_grade(args: argparse.Namespace) -> None:
    from distill.grading import grade_file

    summary = grade_file(args.input, args.output, gold_field=args.gold_field, response_field=args.response_field,
                         workers=args.workers)
    print(f"{summary['correct']}/{summary['n']} correct (accuracy {summary['accuracy']:.4f}) -> {args.output}")


def cmd_report(args: argparse.Namespace) -> None:
    from distill.report import write_report

    path, table = write_report(args.run)
    print(table)
    print(f"-> {path} (+ report.json, report.png)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("status", help="print a run's manifest as a table")
    p.add_argument("--run", type=Path, help="run directory, e.g. runs/tiny (default: from --config)")
    p.add_argument("--config", default="configs/tiny.yaml", help="config whose run to show (default: %(default)s)")
    p.add_argument("--name", help="run name, when it differs from the config's")
    p.add_argument("--json", action="store_true", help="print the raw manifest")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("grade", help="grade a JSONL file of responses against gold answers",
                       description="Adds `pred_answer` and `correct` to every record (math-verify equivalence).")
    p.add_argument("--input", required=True, type=Path, help="JSONL with gold and response fields")
    p.add_argument("--output", required=True, type=Path, help="graded JSONL to write")
    p.add_argument("--gold-field", default="gold", help="field holding the gold answer (default: %(default)s)")
    p.add_argument("--response-field", default="response", help="field holding the response (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="grading processes (default: one per CPU)")
    p.set_defaults(func=cmd_grade)

    p = sub.add_parser("report", help="write report.md/.json/.png for a run from its manifest")
    p.add_argument("--run", required=True, type=Path, help="run directory, e.g. runs/tiny")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
