"""PairRecord <-> pairs row: the one place that knows how a record is laid out in SQL."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from typing import Any, Literal

from sqlalchemy import Connection, Row, Select, select
from sqlalchemy.exc import DBAPIError

from gates.records import Label, ModelResult, PairRecord
from storage.codec import (
    decode_inputs,
    decode_output,
    encode_inputs,
    encode_output,
    inputs_digest,
)
from storage.schema import PairRow


def _finite_features(features: dict[str, Any]) -> dict[str, Any]:
    # JSON (and PostgreSQL's JSONB) has no NaN or infinity: a non-finite feature is
    # stored as missing rather than failing the whole batch.
    return {
        str(k): v
        for k, v in features.items()
        if not (isinstance(v, float) and not math.isfinite(v))
    }


def clean_label(label: Any) -> Label:
    if isinstance(label, float) and not math.isfinite(label):
        return None
    return label


PAIR_COLUMNS = (
    "rollout_id",
    "request_id",
    "ts",
    "slices",
    "features",
    "inputs_digest",
    "inputs",
    "champion_output",
    "champion_latency_ms",
    "champion_error",
    "candidate_output",
    "candidate_latency_ms",
    "candidate_error",
    "label",
    "label_ts",
    "stage",
    "served_by",
    "champion_output_name",
    "champion_datatype",
    "champion_shape",
    "candidate_output_name",
    "candidate_datatype",
    "candidate_shape",
)
# One encoder: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
JSON_COLUMNS = frozenset({"slices", "features", "label", "champion_shape", "candidate_shape"})
REQUEST_ID = PAIR_COLUMNS.index("request_id")


def insert_sql(
    table: str, columns: Sequence[str], json_columns: frozenset[str], dialect: str
) -> str:
    """A driver-level INSERT: the hot path skips SQLAlchemy's per-row bind processing
    (it costs more than the insert itself), so JSON is serialized here, once."""
    if dialect == "postgresql":
        marks = ["CAST(%s AS jsonb)" if c in json_columns else "%s" for c in columns]
    else:
        marks = ["?"] * len(columns)
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(marks)})"


@functools.lru_cache(maxsize=16)
def _insert_sql_cached(
    table: str, columns: tuple[str, ...], json_columns: frozenset[str], dialect: str
) -> str:
    return insert_sql(table, columns, json_columns, dialect)


def insert_pairs(conn: Connection, params: Sequence[tuple[Any, ...]]) -> None:
    """Bulk insert of ``record_to_params`` tuples: COPY on PostgreSQL, one executemany
    on SQLite."""
    bulk_insert(conn, "pairs", PAIR_COLUMNS, JSON_COLUMNS, params)


def bulk_insert(
    conn: Connection,
    table: str,
    columns: Sequence[str],
    json_columns: frozenset[str],
    params: Sequence[tuple[Any, ...]],
) -> None:
    """Insert rows of driver-level values (JSON already text) inside ``conn``'s
    transaction. PostgreSQL gets COPY: a per-row INSERT, even pipelined, costs several
    times more client CPU than the row's encoding."""
    if not params:
        return
    if conn.dialect.name == "postgresql":
        raw: Any = conn.connection.dbapi_connection  # a psycopg 3 connection
        sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
        dbapi = conn.dialect.loaded_dbapi
        try:
            with raw.cursor() as cur, cur.copy(sql) as copy:
                for row in params:
                    copy.write_row(row)
        except dbapi.Error as exc:
            # Outside SQLAlchemy's execute: wrap the driver's error as it would
            # (IntegrityError, OperationalError...) and drop a dead connection.
            if conn.dialect.is_disconnect(exc, raw, None):
                conn.invalidate(exc)
            raise DBAPIError.instance(sql, None, exc, dbapi.Error) from exc
        return
    conn.exec_driver_sql(
        _insert_sql_cached(table, tuple(columns), json_columns, "sqlite"), list(params)
    )


def dumps(value: Any) -> str | None:
    """JSON text of a JSON column (None stays SQL NULL, as the schema's none_as_null)."""
    if value is None:
        return None
    if not value and isinstance(value, dict):
        return "{}"
    return _ENCODER.encode(value)


def _slices_json(slices: dict[str, str]) -> str:
    try:
        return _slices_json_of(tuple(slices.items()))
    except TypeError:  # an unhashable value: encode it without the memo
        return _ENCODER.encode({str(k): str(v) for k, v in slices.items()})


@functools.lru_cache(maxsize=4096)
def _slices_json_of(items: tuple[tuple[str, str], ...]) -> str:
    # Slices repeat (a few platforms, countries...): their JSON is memoized.
    return _ENCODER.encode({str(k): str(v) for k, v in items})


def _features_json(features: dict[str, Any]) -> str:
    try:
        return _ENCODER.encode(features)
    except ValueError:  # NaN or infinity somewhere: store those features as missing
        return _ENCODER.encode(_finite_features(features))


@functools.lru_cache(maxsize=256)
def _shape_json(shape: tuple[int, ...] | None) -> str | None:
    # A handful of shapes per rollout: their JSON is memoized like the slices'.
    return None if shape is None else _ENCODER.encode([int(d) for d in shape])


def _shape(value: Any) -> tuple[int, ...] | None:
    # JSON columns come back parsed on both databases; text only through raw drivers.
    if value is None:
        return None
    if isinstance(value, str):
        value = json.loads(value)
    return tuple(int(d) for d in value)


def record_to_params(record: PairRecord, rollout_id: str, *, store_inputs: bool) -> tuple[Any, ...]:
    """The insert parameters of one pair, in ``PAIR_COLUMNS`` order."""
    digest = record.inputs_digest
    if not digest and record.inputs:
        digest = inputs_digest(record.inputs)
    blob = encode_inputs(record.inputs) if store_inputs and record.inputs else None
    label = clean_label(record.label)
    slices = record.slices
    champion, candidate = record.champion, record.candidate
    return (
        rollout_id,
        record.id,
        float(record.ts),
        _slices_json(slices) if slices else "{}",
        _features_json(record.features) if record.features else "{}",
        digest,
        blob,
        encode_output(champion.output),
        champion.latency_ms,
        champion.error,
        encode_output(candidate.output),
        candidate.latency_ms,
        candidate.error,
        dumps(label),
        float(record.ts) if label is not None else None,
        record.stage,
        record.served_by,
        champion.name,
        champion.datatype,
        _shape_json(champion.shape),
        candidate.name,
        candidate.datatype,
        _shape_json(candidate.shape),
    )


# Every column a PairRecord needs, without the (possibly large) inputs blob.
RECORD_COLUMNS = (
    PairRow.id,
    PairRow.rollout_id,
    PairRow.request_id,
    PairRow.ts,
    PairRow.slices,
    PairRow.features,
    PairRow.inputs_digest,
    PairRow.champion_output,
    PairRow.champion_latency_ms,
    PairRow.champion_error,
    PairRow.candidate_output,
    PairRow.candidate_latency_ms,
    PairRow.candidate_error,
    PairRow.label,
    PairRow.stage,
    PairRow.served_by,
    PairRow.champion_output_name,
    PairRow.champion_datatype,
    PairRow.champion_shape,
    PairRow.candidate_output_name,
    PairRow.candidate_datatype,
    PairRow.candidate_shape,
)


def select_records(*, with_inputs: bool = False) -> Select[Any]:
    cols = (*RECORD_COLUMNS, PairRow.inputs) if with_inputs else RECORD_COLUMNS
    return select(*cols)


def row_to_record(row: Row[Any], *, with_inputs: bool = False) -> PairRecord:
    m = row._mapping
    inputs = None
    if with_inputs and m.get("inputs") is not None:
        inputs = decode_inputs(m["inputs"])
    served_by: Literal["champion", "candidate"] = (
        "candidate" if m["served_by"] == "candidate" else "champion"
    )
    return PairRecord(
        id=m["request_id"],
        ts=float(m["ts"]),
        champion=ModelResult(
            output=decode_output(m["champion_output"]),
            latency_ms=m["champion_latency_ms"],
            error=m["champion_error"],
            name=m["champion_output_name"],
            datatype=m["champion_datatype"],
            shape=_shape(m["champion_shape"]),
        ),
        candidate=ModelResult(
            output=decode_output(m["candidate_output"]),
            latency_ms=m["candidate_latency_ms"],
            error=m["candidate_error"],
            name=m["candidate_output_name"],
            datatype=m["candidate_datatype"],
            shape=_shape(m["candidate_shape"]),
        ),
        slices=dict(m["slices"] or {}),
        features=dict(m["features"] or {}),
        label=m["label"],
        inputs_digest=m["inputs_digest"] or "",
        stage=m["stage"],
        served_by=served_by,
        inputs=inputs,
    )
