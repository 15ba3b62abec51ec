"""``mirrorgate suite run|curate``: the exported pinned suite against any model.

``suite run --suite DIR --model SPEC [--role champion] [--json]``: SPEC is an ``.onnx``
file, a backend settings YAML (the ``models.candidate`` block of a config) or a
mirrorgate config (its candidate, or ``--role champion``). Exit 0 all pass, 1 any case
regresses, 2 bad input. Each run is appended to ``DIR/results.jsonl`` (``--no-record``
to skip), which ``suite curate`` reads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from proxy.cli.progress import add_quiet, track
from proxy.suite.runner import (
    RESULTS,
    curate,
    format_table,
    load_suite,
    read_results,
    record_result,
    run_suite_on,
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("suite", help="run or curate a pinned never-regress suite")
    sub = parser.add_subparsers(dest="suite_cmd", metavar="ACTION", required=True)
    p = sub.add_parser("run", help="run every pinned case on a model; exit 1 on a regression")
    p.add_argument("--suite", required=True, metavar="DIR", help="suite folder")
    p.add_argument("--model", required=True, metavar="SPEC", help=".onnx, backend YAML or config")
    p.add_argument(
        "--role",
        choices=("candidate", "champion"),
        default="candidate",
        help="which side the model plays in the recorded result (default candidate)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-record", action="store_true", help="do not append to results.jsonl")
    add_quiet(p)
    p.set_defaults(func=run)
    p = sub.add_parser("curate", help="cases every recent model passes easily; repeat blockers")
    p.add_argument("--suite", required=True, metavar="DIR", help="suite folder")
    p.add_argument("--recent", type=int, default=5, help="distinct recent models considered")
    p.add_argument(
        "--wide-margin",
        type=float,
        default=0.5,
        help="retire cases every recent model passes by at least this margin",
    )
    p.add_argument(
        "--min-failures",
        type=int,
        default=2,
        help="repeat blockers: cases failed in at least this many runs",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_curate)


def run(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite)
    result = asyncio.run(
        run_suite_on(
            suite,
            args.model,
            role=args.role,
            wrap=lambda cases: track(cases, args, desc="suite", unit="case", total=len(cases)),
        )
    )
    if not args.no_record:
        try:
            record_result(suite, result)
        except OSError as exc:
            print(f"mirrorgate: warning: results not recorded: {exc}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_table(result))
    return 1 if result.failed else 0


def run_curate(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite)
    runs = read_results(suite.path / RESULTS)
    cur = curate(
        suite,
        runs,
        recent_models=args.recent,
        wide_margin=args.wide_margin,
        min_failures=args.min_failures,
    )
    if args.json:
        print(json.dumps(cur.to_dict(), indent=2))
        return 0
    print(f"{cur.runs} recorded runs; recent models: {', '.join(cur.models) or '-'}")
    print(f"retire candidates (every recent model passes with margin >= {args.wide_margin}):")
    for r in cur.retire:
        print(f"  {r['id']}  min margin {r['min_margin']:.4f} over {r['runs']} models")
    print(f"repeat blockers (failed in >= {args.min_failures} runs):")
    for b in cur.blockers:
        print(f"  {b['id']}  {b['failures']} failures: {', '.join(b['models'])}")
    return 0
