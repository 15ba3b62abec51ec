"""``mirrorgate rollouts list``: the rollouts in the database, newest first.

Columns: id, champion, candidate, revision (the candidate's model digest, short), stage,
status, verdict (the last recorded decision), pairs, labels (pairs with a joined label).
``--json`` prints one object per rollout instead (a list).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from proxy.cli.commands._storage import add_db_args, open_db


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "rollouts",
        help="list the rollouts in the database",
        description="List rollouts (ids for `export pairs --rollout`, `report`, ...).",
    )
    sub = parser.add_subparsers(dest="rollouts_command", metavar="ACTION", required=True)
    p = sub.add_parser("list", help="one line per rollout, newest first")
    add_db_args(p)
    p.add_argument(
        "--status",
        choices=("active", "promoted", "aborted", "ended"),
        help="only rollouts with this status",
    )
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=run_list)


def _row(s: Any) -> dict[str, Any]:
    r = s.rollout
    cand = r.candidate
    return {
        "id": r.id,
        "champion": r.champion.name,
        "candidate": cand.name if cand is not None else None,
        "revision": r.extra.get("revision") or (cand.digest[:12] if cand is not None else None),
        "stage": r.stage,
        "status": r.status,
        "verdict": s.verdict,
        "pairs": s.pairs,
        "labels": s.labels,
        "created_at": r.created_at,
    }


def run_list(args: argparse.Namespace) -> int:
    from proxy.core.errors import ConfigError
    from storage.errors import StorageError
    from storage.store import Store
    from storage.summary import summaries

    db = open_db(args, migrate="refuse")
    try:
        rows = [_row(s) for s in summaries(Store(db), status=args.status, limit=args.limit)]
    except StorageError as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        db.dispose()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["id", "champion", "candidate", "revision", "stage", "status", "verdict"]
    cols += ["pairs", "labels"]
    table = [cols] + [["-" if row[c] is None else str(row[c]) for c in cols] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    return 0
