"""Sign-offs: a reviewer's decision recorded against the digest of the report they read.

Pure logic: what a sign-off is, whether it still matches a report, and the JSON Lines
form kept beside a pack (``signoffs.jsonl``) until storage keeps them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from proxy.core.errors import BadRequest
from proxy.report.document import report_digest

Decision = Literal["approve", "reject"]
DECISIONS: tuple[Decision, ...] = ("approve", "reject")


@dataclass(frozen=True, slots=True)
class SignOff:
    reviewer: str
    decision: Decision
    note: str
    ts: float
    digest: str

    def to_dict(self) -> dict[str, Any]:
        """The form inside the report document's ``signoffs`` array."""
        return {
            "reviewer": self.reviewer,
            "decision": self.decision,
            "note": self.note,
            "ts": self.ts,
            "digest": self.digest,
        }

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "signoff") -> SignOff:
        if not isinstance(data, dict):
            raise BadRequest(f"{where}: expected a JSON object")
        reviewer = data.get("reviewer")
        if not isinstance(reviewer, str) or not reviewer.strip():
            raise BadRequest(f"{where}.reviewer: expected a non-empty string")
        decision = data.get("decision")
        if decision not in DECISIONS:
            raise BadRequest(f"{where}.decision: expected 'approve' or 'reject'")
        note = data.get("note", "")
        if not isinstance(note, str):
            raise BadRequest(f"{where}.note: expected a string")
        ts = data.get("ts")
        if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
            raise BadRequest(f"{where}.ts: expected a finite number")
        digest = data.get("digest")
        if not isinstance(digest, str) or len(digest) != 64 or digest.strip("0123456789abcdef"):
            raise BadRequest(f"{where}.digest: expected a sha256 hex digest")
        return cls(reviewer=reviewer, decision=decision, note=note, ts=float(ts), digest=digest)


@dataclass(frozen=True, slots=True)
class SignoffCheck:
    signoff: SignOff
    current_digest: str

    @property
    def matches(self) -> bool:
        return self.signoff.digest == self.current_digest


def check_signoff(
    report: Mapping[str, Any] | str | os.PathLike[str], signoff: SignOff
) -> SignoffCheck:
    """Does ``signoff`` still cover ``report`` (a document or the path of report.json)?"""
    return SignoffCheck(signoff=signoff, current_digest=report_digest(report))


def check_all(doc: Mapping[str, Any]) -> list[SignoffCheck]:
    """Every sign-off recorded in the document, checked against the document itself."""
    current = report_digest(doc)
    return [
        SignoffCheck(
            signoff=SignOff.from_dict(raw, where=f"$.signoffs[{i}]"), current_digest=current
        )
        for i, raw in enumerate(doc.get("signoffs") or [])
    ]


def merge_signoffs(*groups: Iterable[SignOff]) -> list[SignOff]:
    """Union of sign-off lists without duplicates, oldest first (stable for the digest)."""
    seen: dict[tuple[str, str, str, float, str], SignOff] = {}
    for group in groups:
        for s in group:
            seen.setdefault((s.reviewer, s.decision, s.note, s.ts, s.digest), s)
    return sorted(seen.values(), key=lambda s: (s.ts, s.reviewer, s.digest))
