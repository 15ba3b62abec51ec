"""The report document: schema validation, canonical JSON and its digest.

The document (``schema.json``, described in ``docs/report.md``) is the contract between
whoever gathers the evidence (storage + gates, or a test) and whoever renders or signs it.
Its digest covers the evidence, not the sign-offs recorded against it: a sign-off stores
the digest it approved, so the digest must not change when the sign-off is added.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from proxy.core.errors import BadRequest

SCHEMA_VERSION = "1"
# Members left out of the digest: sign-offs are recorded *against* the digest.
UNSIGNED_MEMBERS = frozenset({"signoffs"})

ReportDoc = dict[str, Any]


@cache
def load_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) shipped beside this module."""
    text = resources.files("proxy.report").joinpath("schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema())


def _where(path: Any) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def validate_document(doc: Any) -> None:
    """Raise BadRequest naming every place where ``doc`` breaks the contract.

    Beyond the schema: histogram edges/counts agree, bands have lower <= upper, numbers
    are finite (JSON has no NaN; a NaN would make the canonical form unwritable).
    """
    errors = sorted(_validator().iter_errors(doc), key=lambda e: [str(p) for p in e.path])
    problems = [f"{_where(e.path)}: {e.message}" for e in errors]
    if not problems:
        problems = _semantic_problems(doc)
    if problems:
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise BadRequest("invalid report document:\n  " + "\n  ".join(shown) + more)


def _non_finite(value: Any, where: str, out: list[str]) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        out.append(f"{where}: {value} is not a finite number")
    elif isinstance(value, dict):
        for k, v in value.items():
            _non_finite(v, f"{where}.{k}", out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _non_finite(v, f"{where}[{i}]", out)


def _semantic_problems(doc: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    _non_finite(dict(doc), "$", out)
    for role in ("champion", "candidate"):
        hist = doc["latency"][role].get("histogram")
        if hist is None:
            continue
        edges, counts = hist["edges"], hist["counts"]
        where = f"$.latency.{role}.histogram"
        if len(edges) != len(counts) + 1:
            out.append(f"{where}: {len(edges)} edges for {len(counts)} counts (need counts + 1)")
        if any(b <= a for a, b in itertools.pairwise(edges)):
            out.append(f"{where}.edges: not strictly increasing")
    for i, series in enumerate(doc["metric_series"]):
        for j, p in enumerate(series["points"]):
            if p["lower"] > p["upper"]:
                out.append(f"$.metric_series[{i}].points[{j}]: lower > upper")
    for i, row in enumerate(doc["slice_table"]["rows"]):
        lo, hi = row["lower"], row["upper"]
        if lo is not None and hi is not None and lo > hi:
            out.append(f"$.slice_table.rows[{i}]: lower > upper")
    return out


def canonical_json(doc: Mapping[str, Any]) -> bytes:
    """RFC 8785 (JSON Canonicalization Scheme) bytes: equal documents, equal bytes.

    JCS fixes key order (UTF-16 code units) and number formatting (ECMAScript's shortest
    round-trip form), so a verifier in any language with a JCS library reproduces the
    digest. Integers beyond 2**53 and NaN/infinity have no JCS form: BadRequest.
    """
    import rfc8785

    try:
        return rfc8785.dumps(doc)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise BadRequest(f"report document is not plain JSON: {exc}") from exc


def load_document(path: str | os.PathLike[str]) -> ReportDoc:
    """Read a report document from a JSON file (not validated); BadRequest on bad input."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise BadRequest(f"cannot read report {path}: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"report {path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BadRequest(f"report {path}: top level must be a JSON object")
    return doc


def report_digest(report: Mapping[str, Any] | str | os.PathLike[str]) -> str:
    """sha256 (hex) of the canonical JSON of the report without its sign-offs.

    ``report`` is the document or the path of a JSON file holding it. The digest is of
    the content, so re-formatting the file keeps it and any edited value changes it.
    """
    doc = load_document(report) if isinstance(report, str | os.PathLike) else report
    signed = {k: v for k, v in doc.items() if k not in UNSIGNED_MEMBERS}
    return hashlib.sha256(canonical_json(signed)).hexdigest()
