"""``mirrorgate pinned list|show|pin|dismiss|reopen`` on a config's database.

The same triage as ``POST /v1/pinned/{id}``: ``--who`` and ``--why`` are required and
recorded in the case's history; nothing else moves a case.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from proxy.cli.commands._storage import add_db_args, open_db
from proxy.control.pinned import ACTIONS, case_to_dict, parse_triage
from proxy.core.errors import BadRequest, ConfigError, NotFound
from storage.entities import PINNED_STATUSES
from storage.errors import InvalidError, NotFoundError, StorageError
from storage.store import Store


def _label(text: str) -> Any:
    """A class or number as JSON (``3``, ``0.5``), else the text itself (``"cat"``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("pinned", help="list, show and triage pinned failure cases")
    sub = parser.add_subparsers(dest="pinned_cmd", metavar="ACTION", required=True)
    p = sub.add_parser("list", help="cases, newest last")
    add_db_args(p)
    p.add_argument("--status", choices=PINNED_STATUSES, help="only cases in this status")
    p.add_argument("--task", help="only this served model name")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=run)
    p = sub.add_parser("show", help="one case with its evidence and triage history (JSON)")
    add_db_args(p)
    p.add_argument("id", type=int, help="pinned case id (see `mirrorgate pinned list`)")
    p.set_defaults(func=run)
    for action in ACTIONS:
        p = sub.add_parser(action, help=f"{action} a case (recorded with who and why)")
        add_db_args(p)
        p.add_argument("id", type=int, help="pinned case id")
        p.add_argument("--who", required=True, help="who decides (recorded)")
        p.add_argument("--why", required=True, help="why (recorded with the triage)")
        if action == "pin":
            p.add_argument("--expected-label", type=_label, help="default: the case's label")
            p.add_argument(
                "--score-tolerance",
                type=float,
                help="largest score difference a replay may show and still pass",
            )
        p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    db = open_db(args, migrate="refuse")
    try:
        store = Store(db)
        if args.pinned_cmd == "list":
            return _list(store, args)
        if args.pinned_cmd == "show":
            case = store.get_pinned(args.id, with_inputs=True)
            print(json.dumps(case_to_dict(case, store.triage_history(args.id)), indent=2))
            return 0
        body: dict[str, Any] = {"action": args.pinned_cmd, "who": args.who, "why": args.why}
        if args.pinned_cmd == "pin":
            if args.expected_label is not None:
                body["expected_label"] = args.expected_label
            if args.score_tolerance is not None:
                body["score_tolerance"] = args.score_tolerance
        t = parse_triage(body)
        case = store.triage(
            args.id,
            t.status,
            actor=t.who,
            reason=t.why,
            expected_label=t.expected_label,
            score_tolerance=t.score_tolerance,
        )
        print(f"case {case.id}: {case.status} (expected label {case.expected_label!r})")
        return 0
    except NotFoundError as exc:
        raise NotFound(str(exc)) from exc
    except InvalidError as exc:
        raise BadRequest(str(exc)) from exc
    except StorageError as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        db.dispose()


def _list(store: Store, args: argparse.Namespace) -> int:
    cases = store.list_pinned(status=args.status, task=args.task)
    if args.json:
        print(json.dumps({"cases": [case_to_dict(c) for c in cases]}, indent=2))
        return 0
    rows = [("id", "status", "rule", "task", "label", "expected", "seen", "digest")]
    for c in cases:
        rows.append(
            (
                str(c.id),
                c.status,
                c.rule,
                c.task,
                str(c.evidence.label),
                str(c.expected_label),
                str(c.recurrence_count),
                c.inputs_digest[:12],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0
