"""Where reports and sign-offs come from: the ``ReportSource`` seam.

The commands ``mirrorgate report`` and ``mirrorgate signoff`` only talk to this protocol.
``PackSource`` implements it over a pack directory (``report.json`` plus a
``signoffs.jsonl`` beside it), which works today without a database. The storage-backed
source is wired in by replacing :func:`open_storage_source`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from proxy.errors import BadRequest, MirrorgateError, NotFound
from proxy.report.document import load_document, validate_document
from proxy.report.signoff import SignOff

SIGNOFFS_NAME = "signoffs.jsonl"


@runtime_checkable
class ReportSource(Protocol):
    def report_document(self, rollout_id: str) -> dict[str, Any]:
        """The report document of a rollout (schema.json); NotFound when unknown.

        Built only from recorded data (no wall-clock fields), so building it twice from
        the same data gives the same digest: a sign-off keeps matching until the
        evidence changes.
        """
        ...

    def signoffs(self, rollout_id: str) -> list[SignOff]:
        """Sign-offs recorded for the rollout, oldest first."""
        ...

    def record_signoff(self, rollout_id: str, signoff: SignOff) -> None:
        """Record one sign-off durably (append-only; earlier ones are never changed)."""
        ...


class PackSource:
    """A ReportSource over one pack directory: ``report.json`` + ``signoffs.jsonl``."""

    def __init__(self, pack_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(pack_dir)
        self.report_path = self.dir / "report.json"
        self.signoffs_path = self.dir / SIGNOFFS_NAME

    def report_document(self, rollout_id: str) -> dict[str, Any]:
        if not self.report_path.is_file():
            raise NotFound(f"no report.json in {self.dir}")
        doc = load_document(self.report_path)
        validate_document(doc)
        found = doc["rollout"]["id"]
        if found != rollout_id:
            raise NotFound(f"the pack in {self.dir} is for rollout {found!r}, not {rollout_id!r}")
        return doc

    def signoffs(self, rollout_id: str) -> list[SignOff]:
        if not self.signoffs_path.exists():
            return []
        try:
            lines = self.signoffs_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise BadRequest(f"cannot read {self.signoffs_path}: {exc}") from exc
        out = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{self.signoffs_path} line {number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadRequest(f"{where}: not valid JSON: {exc}") from exc
            if not isinstance(data, dict) or not isinstance(data.get("rollout"), str):
                raise BadRequest(f"{where}: expected an object with a 'rollout' string")
            if data["rollout"] == rollout_id:
                fields = {k: v for k, v in data.items() if k != "rollout"}
                out.append(SignOff.from_dict(fields, where=where))
        return sorted(out, key=lambda s: s.ts)

    def record_signoff(self, rollout_id: str, signoff: SignOff) -> None:
        line = json.dumps(
            {"rollout": rollout_id, **signoff.to_dict()},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            # One write of one line with O_APPEND: concurrent reviewers never interleave.
            fd = os.open(self.signoffs_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise BadRequest(
                f"cannot record the sign-off in {self.signoffs_path}: {exc.strerror or exc}"
            ) from exc


def open_storage_source(config_path: str | None) -> ReportSource:
    """The storage-backed ReportSource for ``--rollout R`` without ``--pack``/``--from-json``.

    SEAM: the storage wiring replaces this body (load the config, open the store, return
    an object implementing :class:`ReportSource`). Until then it says what to use instead.
    """
    raise MirrorgateError(
        "reading rollouts from storage is not wired in yet; render an existing report "
        "document with 'mirrorgate report --from-json FILE --out DIR' and sign a pack with "
        "'mirrorgate signoff --pack DIR ...'"
    )
