"""``mirrorgate report``: write the validation pack (report.html + report.json) of a rollout.

Either from storage (``--rollout R``, through the ReportSource seam) or from an existing
report document (``--from-json FILE``). Sign-offs recorded in ``signoffs.jsonl`` inside
``--out`` are kept on the page, so re-rendering a signed pack never loses them.
"""

from __future__ import annotations

import argparse
from typing import Any

from proxy.cli.progress import Steps, add_quiet


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "report",
        help="write a rollout's validation pack (report.html + report.json)",
        description="Write the validation pack of a rollout: a self-contained HTML page and "
        "the same content as canonical JSON (the document reviewers sign). Exit 0 on "
        "success, 2 on bad input.",
    )
    parser.add_argument("--rollout", metavar="R", help="rollout id (read from storage)")
    parser.add_argument(
        "--from-json",
        metavar="FILE",
        help="render an existing report document instead of reading storage",
    )
    parser.add_argument("--out", metavar="DIR", required=True, help="directory of the pack")
    parser.add_argument("--config", metavar="FILE", help="config naming the store (storage)")
    add_quiet(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with Steps(args, 3, "report") as step:
        return _run(args, step)


def _run(args: argparse.Namespace, step: Steps) -> int:
    # Imported here: the report stack (jsonschema) stays off every other command's start-up.
    from proxy.core.errors import BadRequest
    from proxy.report import source as sources
    from proxy.report.build import write_pack
    from proxy.report.document import load_document
    from proxy.report.signoff import SignOff, check_all, merge_signoffs

    if args.from_json:
        doc = load_document(args.from_json)
        meta = doc.get("rollout")
        rollout = meta.get("id") if isinstance(meta, dict) else None
        if args.rollout and rollout != args.rollout:
            raise BadRequest(
                f"{args.from_json} is the report of rollout {rollout!r}, not {args.rollout!r}"
            )
        recorded: list[SignOff] = []
    elif args.rollout:
        store = sources.open_storage_source(args.config)
        doc = store.report_document(args.rollout)
        rollout = args.rollout
        recorded = store.signoffs(args.rollout)
    else:
        raise BadRequest("give --rollout R (read from storage) or --from-json FILE")
    step("document")

    embedded = [
        SignOff.from_dict(s, where=f"$.signoffs[{i}]")
        for i, s in enumerate(doc.get("signoffs") or [])
    ]
    beside = sources.PackSource(args.out).signoffs(rollout) if isinstance(rollout, str) else []
    doc["signoffs"] = [s.to_dict() for s in merge_signoffs(embedded, recorded, beside)]
    pack = write_pack(doc, args.out)
    step("pack written")

    checks = check_all(doc)
    step("sign-offs checked")
    verdict = doc["verdict"]
    print(f"report:    {pack.html_path}")
    print(f"json:      {pack.json_path}")
    print(f"digest:    {pack.digest}")
    print(f"verdict:   {verdict['verdict'].upper()}: {verdict['reason']}")
    mismatched = sum(not c.matches for c in checks)
    note = f" ({mismatched} no longer match the report)" if mismatched else ""
    print(f"sign-offs: {len(checks)} recorded{note}")
    return 0
