"""Readers of the paired-record and label JSON Lines files (DESIGN.md formats).

Self-contained on purpose (no SQL, no other storage module): ``mirrorgate replay`` and the
import command use it. Errors are ``ValueError`` naming the file and line:
``pairs.jsonl:12: record.ts: expected a finite number``. Blank lines are skipped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any

from gates.records import Label, PairRecord

PathLike = str | os.PathLike[str]


def _lines(path: PathLike) -> Iterator[tuple[int, str]]:
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from exc
    with fh:
        try:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    yield number, line
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text: {exc.reason}") from exc


def _load(path: PathLike, number: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})") from exc


def read_pairs(path: PathLike) -> Iterator[PairRecord]:
    """Yield the :class:`PairRecord` of every line of a paired-record file."""
    for number, line in _lines(path):
        data = _load(path, number, line)
        try:
            yield PairRecord.from_dict(data, where="record")
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from exc


def read_labels(path: PathLike) -> Iterator[tuple[str, Label, float | None]]:
    """Yield ``(id, label, ts or None)`` from a label file (``{"id", "label", "ts"?}``)."""
    for number, line in _lines(path):
        data = _load(path, number, line)
        where = f"{path}:{number}"
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object")
        rid = data.get("id")
        if not isinstance(rid, str | int) or isinstance(rid, bool) or rid == "":
            raise ValueError(f"{where}: id: expected a non-empty string")
        if "label" not in data:
            raise ValueError(f"{where}: label: missing")
        label = data["label"]
        if isinstance(label, dict | bool):
            raise ValueError(f"{where}: label: expected a number, string or list of numbers")
        ts = data.get("ts")
        if ts is not None and (
            not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts)
        ):
            raise ValueError(f"{where}: ts: expected a finite number")
        yield str(rid), label, None if ts is None else float(ts)
