"""``mirrorgate signoff``: record a reviewer's decision against the report's digest.

The sign-off stores the sha256 of the report's canonical JSON (sign-offs excluded); a
report changed afterwards no longer matches it, and the page says so. ``--pack DIR``
records into ``DIR/signoffs.jsonl`` (until storage keeps sign-offs) and re-renders the
pack; ``--verify`` checks every recorded sign-off instead of adding one.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

DECISIONS = ("approve", "reject")


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "signoff",
        help="record a reviewer's approve/reject against a rollout's report",
        description="Record a reviewer's decision against the digest of a rollout's report "
        "document, or --verify the recorded ones. Exit 0 recorded (or all verified), "
        "1 refused/mismatch (the report changed), 2 bad input.",
    )
    parser.add_argument("--rollout", metavar="R", required=True, help="rollout id")
    parser.add_argument("--reviewer", metavar="NAME", help="who signs")
    parser.add_argument("--decision", choices=DECISIONS, help="approve or reject")
    parser.add_argument("--note", default="", help="free-text note kept with the sign-off")
    parser.add_argument(
        "--digest",
        metavar="SHA256",
        help="the digest printed on the report you reviewed: refuse if the "
        "report has changed since",
    )
    parser.add_argument(
        "--pack",
        metavar="DIR",
        help="a pack written by 'mirrorgate report' (sign-offs go to "
        "DIR/signoffs.jsonl) instead of storage",
    )
    parser.add_argument("--config", metavar="FILE", help="config naming the store (storage)")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check the recorded sign-offs instead of recording one",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from proxy.core.errors import BadRequest
    from proxy.report import source as sources
    from proxy.report.build import fmt_ts, write_pack
    from proxy.report.document import report_digest
    from proxy.report.signoff import SignOff, check_all, merge_signoffs

    store: sources.ReportSource = (
        sources.PackSource(args.pack) if args.pack else sources.open_storage_source(args.config)
    )
    doc = store.report_document(args.rollout)
    current = report_digest(doc)

    if args.verify:
        if args.reviewer or args.decision:
            raise BadRequest("--verify checks recorded sign-offs; drop --reviewer/--decision")
        doc["signoffs"] = [s.to_dict() for s in store.signoffs(args.rollout)]
        checks = check_all(doc)
        for c in checks:
            state = "matches" if c.matches else "MISMATCH (report changed after sign-off)"
            print(f"{c.signoff.reviewer} {c.signoff.decision} at {fmt_ts(c.signoff.ts)}: {state}")
        if not checks:
            print(f"no sign-offs recorded for rollout {args.rollout}", file=sys.stderr)
            return 1
        return 0 if all(c.matches for c in checks) else 1

    if not args.reviewer or not args.reviewer.strip():
        raise BadRequest("--reviewer NAME is required (non-empty)")
    if not args.decision:
        raise BadRequest("--decision approve|reject is required")
    if args.digest and args.digest.lower() != current:
        print(
            f"mirrorgate: refused: the report of rollout {args.rollout} has changed since "
            f"you reviewed it (reviewed {args.digest.lower()}, now {current}); regenerate "
            "it and review again",
            file=sys.stderr,
        )
        return 1

    signoff = SignOff(
        reviewer=args.reviewer.strip(),
        decision=args.decision,
        note=args.note,
        ts=time.time(),
        digest=current,
    )
    store.record_signoff(args.rollout, signoff)
    if args.pack:
        # Re-render so the page shows the sign-off; the digest excludes sign-offs, so the
        # sign-off just recorded matches the re-rendered pack.
        doc["signoffs"] = [s.to_dict() for s in merge_signoffs(store.signoffs(args.rollout))]
        write_pack(doc, args.pack)
    print(
        f"recorded: {signoff.reviewer} {signoff.decision}s rollout {args.rollout} "
        f"(report digest {current})"
    )
    return 0
