"""``mirrorgate export pairs --rollout R --out FILE``: the paired-record JSON Lines file.

``export`` takes one kind per subcommand (``pairs`` here; ``pinned`` is the pinned
suite's), each a function in ``EXPORTERS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any

from gates.records import PairRecord
from proxy.cli.commands._storage import add_db_args, open_db
from proxy.cli.progress import add_quiet, enabled, track
from proxy.core.errors import BadRequest, ConfigError, NotFound
from proxy.suite.runner import export_suite
from storage.errors import NotFoundError, StorageError
from storage.files import write_pairs
from storage.store import Store


def _add_pairs(sub: Any) -> None:
    p = sub.add_parser("pairs", help="a rollout's pairs as JSON Lines (DESIGN.md format)")
    add_db_args(p)
    p.add_argument("--rollout", required=True, help="rollout id (see `mirrorgate rollouts list`)")
    p.add_argument("--out", required=True, metavar="FILE", help="output file ('-': stdout)")
    p.add_argument("--since", type=float, help="only pairs with ts >= this (epoch seconds)")
    p.add_argument("--until", type=float, help="only pairs with ts < this (epoch seconds)")
    add_quiet(p)
    p.set_defaults(func=run_pairs)


def run_pairs(args: argparse.Namespace) -> int:
    db = open_db(args, migrate="refuse")
    try:
        store = Store(db)
        store.get_rollout(args.rollout)
        records: Iterable[PairRecord] = store.iter_pairs(
            args.rollout, since=args.since, until=args.until
        )
        if enabled(args):
            total = store.count_pairs(args.rollout)
            records = track(records, args, desc="export", unit="pair", total=total)
        n = write_pairs(args.out, records)
    except NotFoundError as exc:
        raise NotFound(str(exc)) from exc
    except StorageError as exc:
        raise ConfigError(str(exc)) from exc
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc
    finally:
        db.dispose()
    if args.out != "-":
        print(f"exported {n} pairs of rollout {args.rollout} to {args.out}", file=sys.stderr)
    return 0


def _add_pinned(sub: Any) -> None:
    p = sub.add_parser("pinned", help="the pinned cases as a never-regress suite folder")
    add_db_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="suite folder (created)")
    p.add_argument("--task", help="only cases of this served model name")
    p.set_defaults(func=run_pinned)


def run_pinned(args: argparse.Namespace) -> int:
    db = open_db(args, migrate="refuse")
    try:
        result = export_suite(Store(db), args.out, task=args.task)
    except StorageError as exc:
        raise ConfigError(str(exc)) from exc
    except OSError as exc:
        raise BadRequest(f"cannot write {args.out}: {exc}") from exc
    finally:
        db.dispose()
    if result.skipped:
        print(
            f"skipped pinned cases without stored inputs: {result.skipped}",
            file=sys.stderr,
        )
    print(f"exported {result.cases} pinned cases to {args.out}", file=sys.stderr)
    return 0


EXPORTERS = {"pairs": _add_pairs, "pinned": _add_pinned}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("export", help="export pairs (JSON Lines) or the pinned suite")
    sub = parser.add_subparsers(dest="export_kind", metavar="KIND", required=True)
    for add in EXPORTERS.values():
        add(sub)
