"""Where reports and sign-offs come from: the ``ReportSource`` seam.

The commands ``mirrorgate report`` and ``mirrorgate signoff`` only talk to this protocol.
``PackSource`` implements it over a pack directory (``report.json`` plus a
``signoffs.jsonl`` beside it), without a database; ``StorageSource`` (what
:func:`open_storage_source` returns) over the store the proxy recorded into.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from proxy.core.config import MirrorgateConfig, load_config
from proxy.core.errors import BadRequest, MirrorgateError, NotFound
from proxy.report.document import load_document, validate_document
from proxy.report.signoff import SignOff
from storage.db import Database
from storage.entities import SignOff as StoredSignOff
from storage.errors import InvalidError, NotFoundError, SchemaError, StorageError
from storage.migrate import ensure_schema
from storage.settings import StorageSettings
from storage.store import Store

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


class StorageSource:
    """A ReportSource over the database: documents built from the rollout's rows
    (:mod:`proxy.report.collect`), sign-offs in the ``signoffs`` table."""

    def __init__(
        self,
        store: Store,
        *,
        config: MirrorgateConfig | None = None,
        config_source: str | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.config_source = config_source

    def report_document(self, rollout_id: str) -> dict[str, Any]:
        from proxy.report.collect import build_document

        try:
            return build_document(
                self.store, rollout_id, config=self.config, config_source=self.config_source
            )
        except NotFoundError as exc:
            raise NotFound(f"{exc} in {self.store.db.display_url}") from exc
        except StorageError as exc:
            raise MirrorgateError(str(exc)) from exc

    def signoffs(self, rollout_id: str) -> list[SignOff]:
        try:
            rows = self.store.signoffs(rollout_id)
        except StorageError as exc:
            raise MirrorgateError(str(exc)) from exc
        return [
            SignOff.from_dict(
                {
                    "reviewer": r.reviewer,
                    "decision": r.decision,
                    "note": r.note,
                    "ts": r.ts,
                    "digest": r.report_digest,
                },
                where=f"sign-off of {r.reviewer} on rollout {rollout_id}",
            )
            for r in rows
        ]

    def record_signoff(self, rollout_id: str, signoff: SignOff) -> None:
        try:
            self.store.record_signoff(
                StoredSignOff(
                    rollout_id=rollout_id,
                    reviewer=signoff.reviewer,
                    decision=signoff.decision,
                    report_digest=signoff.digest,
                    note=signoff.note,
                    ts=signoff.ts,
                )
            )
        except NotFoundError as exc:
            raise NotFound(str(exc)) from exc
        except (InvalidError, StorageError) as exc:
            raise BadRequest(f"cannot record the sign-off: {exc}") from exc

    def close(self) -> None:
        self.store.db.dispose()


def open_storage_source(config_path: str | None) -> StorageSource:
    """The storage-backed ReportSource for ``--rollout R`` without ``--pack``/``--from-json``.

    The database is ``storage.url`` of the config (else ``MIRRORGATE_STORAGE__URL``, else
    the default ``sqlite:///mirrorgate.sqlite``). It must exist with the current schema:
    reading a report never creates or migrates a database.
    """
    config: MirrorgateConfig | None = None
    if config_path is not None:
        config = load_config(config_path)
        settings = config.storage
    else:
        env = os.environ.get("MIRRORGATE_STORAGE__URL")
        settings = StorageSettings(url=env) if env else StorageSettings()
    url = settings.url
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_file():
            raise BadRequest(
                f"no database at {path}: give --config FILE naming the store the proxy "
                "recorded into (storage.url)"
            )
    try:
        db = Database(url)
        ensure_schema(db, "refuse")
    except (SchemaError, StorageError) as exc:
        raise BadRequest(f"storage {url}: {exc}") from exc
    return StorageSource(Store(db), config=config, config_source=config_path)
