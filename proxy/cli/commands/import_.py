"""``mirrorgate import pairs FILE [--rollout R]`` and ``mirrorgate import labels FILE``.

The whole file is validated and written in one transaction: a bad line (reported with
its number, exit code 2) leaves the database as it was.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

from proxy.cli.commands._storage import add_db_args, open_db
from proxy.cli.progress import add_quiet, track
from proxy.core.errors import BadRequest, ConfigError
from storage.entities import LabelEntry, ModelInfo
from storage.errors import StorageError
from storage.files import read_labels, read_pairs
from storage.store import Store


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("import", help="import pairs or labels (JSON Lines)")
    sub = parser.add_subparsers(dest="import_kind", metavar="KIND", required=True)
    p = sub.add_parser("pairs", help="load a paired-record file into a rollout")
    p.add_argument("file", help="JSON Lines file ('-': stdin; .gz is read as gzip)")
    add_db_args(p)
    p.add_argument(
        "--rollout",
        help="append to this rollout (created when missing); default: a new rollout",
    )
    add_quiet(p)
    p.set_defaults(func=run_pairs)
    lb = sub.add_parser("labels", help="load a label file ({id, label, ts} per line)")
    lb.add_argument("file", help="label JSON Lines file ('-': stdin; .gz is read as gzip)")
    add_db_args(lb)
    add_quiet(lb)
    lb.set_defaults(func=run_labels)


def _file_digest(path: str) -> str:
    if path == "-":
        return "stdin"
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise BadRequest(f"{path}: cannot open: {exc.strerror or exc}") from exc
    return h.hexdigest()


def run_pairs(args: argparse.Namespace) -> int:
    digest = _file_digest(args.file)
    db = open_db(args, migrate="upgrade")
    source = ModelInfo(name=Path(args.file).name, kind="file", digest=digest)
    try:
        rollout_id, n, _created = Store(db).import_pairs(
            track(read_pairs(args.file), args, desc="import", unit="pair"),
            source=source,
            rollout_id=args.rollout,
            extra={"imported_from": args.file},
        )
    except ValueError as exc:
        raise BadRequest(f"nothing imported: {exc}") from exc
    except StorageError as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        db.dispose()
    print(f"imported {n} pairs into rollout {rollout_id}", file=sys.stderr)
    print(rollout_id)
    return 0


def run_labels(args: argparse.Namespace) -> int:
    db = open_db(args, migrate="upgrade")
    now = time.time()
    try:
        entries = [
            LabelEntry(
                request_id=rid,
                label=label,
                ts=now if ts is None else ts,
                received_at=now,
                source="file",
            )
            for rid, label, ts in track(read_labels(args.file), args, desc="read", unit="label")
        ]
        joined = Store(db).add_labels(entries, now=now)
    except ValueError as exc:
        raise BadRequest(f"nothing imported: {exc}") from exc
    except StorageError as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        db.dispose()
    print(f"imported {len(entries)} labels; {len(joined)} pairs labelled", file=sys.stderr)
    return 0
