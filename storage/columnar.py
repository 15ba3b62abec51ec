"""Paired records as Parquet (pyarrow), beside JSON Lines, for large captures.

``mirrorgate export pairs --out FILE.parquet`` writes it, ``import pairs`` and ``replay``
read it (``storage.files`` dispatches on the ``.parquet`` suffix). One row per record:

=====================  ====================  =========================================
column                 type                  from the JSON Lines form
=====================  ====================  =========================================
id                     string                ``id``
ts                     float64               ``ts``
slices, features       string (JSON object)  ``slices``, ``features``
label                  string (JSON), null   ``label``
champion_output        list<float64>, null   ``champion.output`` (a scalar: 1 element
candidate_output                             and ``*_scalar`` true)
champion_scalar, ...   bool
*_latency_ms           float64, null         ``*.latency_ms``
*_error                string, null          ``*.error``
inputs_digest, stage,  string                as in JSON Lines
served_by
*_strings              list<string>, null    ``*.output`` when it is strings (BYTES);
                                             ``*_output`` is then null
*_output_name          string, null          ``*.output_name``
*_datatype             string, null          ``*.datatype``
*_shape                list<int64>, null     ``*.shape``
=====================  ====================  =========================================

The last four column groups came with output descriptors (issue 12); a file written
before them is read as records without descriptors and without string outputs.

Reading is columnar: ids, timestamps, latencies and outputs come out of Arrow arrays in
bulk (a batch's outputs are one float64 matrix whose rows become the records' outputs
without a copy), which is what lets ``replay`` keep up with the gates. Small JSON
members (slices, features, label) are parsed per row with orjson. The file is checked
against this schema and ``ValueError`` names the first bad row or column.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from gates.records import ModelResult, PairRecord

BATCH = 65_536
SIDES = ("champion", "candidate")


def _schema() -> Any:
    import pyarrow as pa

    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("ts", pa.float64(), nullable=False),
        pa.field("slices", pa.string()),
        pa.field("features", pa.string()),
        pa.field("label", pa.string()),
    ]
    for side in SIDES:
        fields += [
            pa.field(f"{side}_output", pa.list_(pa.float64())),
            pa.field(f"{side}_scalar", pa.bool_()),
            pa.field(f"{side}_latency_ms", pa.float64()),
            pa.field(f"{side}_error", pa.string()),
        ]
    fields += [
        pa.field("inputs_digest", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("served_by", pa.string()),
    ]
    return pa.schema(fields + _descriptor_fields())


def _descriptor_fields() -> list[Any]:
    """Columns added with output descriptors: optional when reading (older files)."""
    import pyarrow as pa

    fields = []
    for side in SIDES:
        fields += [
            pa.field(f"{side}_strings", pa.list_(pa.string())),
            pa.field(f"{side}_output_name", pa.string()),
            pa.field(f"{side}_datatype", pa.string()),
            pa.field(f"{side}_shape", pa.list_(pa.int64())),
        ]
    return fields


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise ValueError("Parquet files need pyarrow: pip install 'mirrorgate[parquet]'") from exc
    return pyarrow


def _columns(records: list[PairRecord]) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {name: [] for name in _schema().names}
    for r in records:
        cols["id"].append(r.id)
        cols["ts"].append(r.ts)
        cols["slices"].append(orjson.dumps(r.slices).decode())
        cols["features"].append(orjson.dumps(r.features).decode())
        cols["label"].append(None if r.label is None else orjson.dumps(r.label).decode())
        for side in SIDES:
            res: ModelResult = getattr(r, side)
            text = res.output is not None and np.asarray(res.output).dtype.kind in "OUS"
            out = None if res.output is None or text else np.asarray(res.output, dtype=np.float64)
            cols[f"{side}_output"].append(None if out is None else out.reshape(-1))
            cols[f"{side}_scalar"].append(out is not None and out.ndim == 0)
            cols[f"{side}_latency_ms"].append(res.latency_ms)
            cols[f"{side}_error"].append(res.error)
            cols[f"{side}_strings"].append(
                [str(v) for v in np.asarray(res.output).reshape(-1)] if text else None
            )
            cols[f"{side}_output_name"].append(res.name)
            cols[f"{side}_datatype"].append(res.datatype)
            cols[f"{side}_shape"].append(None if res.shape is None else list(res.shape))
        cols["inputs_digest"].append(r.inputs_digest)
        cols["stage"].append(r.stage)
        cols["served_by"].append(r.served_by)
    return cols


def write_parquet(path: str | os.PathLike[str], records: Iterable[PairRecord]) -> int:
    """Write records as Parquet (atomically: a temporary file renamed at the end)."""
    from storage.files import file_mode

    pa = _pyarrow()
    schema = _schema()
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise ValueError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    os.close(fd)
    n = 0
    try:
        with pa.parquet.ParquetWriter(tmp, schema, compression="zstd") as writer:
            batch: list[PairRecord] = []
            for record in records:
                batch.append(record)
                if len(batch) >= BATCH:
                    writer.write_table(pa.table(_columns(batch), schema=schema))
                    n += len(batch)
                    batch = []
            if batch or n == 0:
                writer.write_table(pa.table(_columns(batch), schema=schema))
                n += len(batch)
        os.chmod(tmp, file_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return n


def _outputs(column: Any, scalar: list[bool], where: str) -> list[Any]:
    """One output per row: row views of a matrix when every row has the same length."""
    n = len(column)
    if n and column.null_count == 0:
        offsets = column.offsets.to_numpy()
        widths = np.diff(offsets)
        if widths.size and (widths == widths[0]).all() and widths[0] > 0:
            flat = column.values.to_numpy(zero_copy_only=False)
            matrix = flat[offsets[0] : offsets[0] + n * widths[0]].reshape(n, widths[0])
            if widths[0] == 1 and all(scalar):
                return list(matrix[:, 0])
            return list(matrix)
    out: list[Any] = []
    for i, value in enumerate(column.to_pylist()):
        if value is None:
            out.append(None)
            continue
        arr = np.asarray(value, dtype=np.float64)
        if scalar[i]:
            if arr.size != 1:
                raise ValueError(f"{where}: row {i}: a scalar output has {arr.size} values")
            arr = arr.reshape(())
        out.append(arr)
    return out


def _members(text: str | None) -> Any:
    if text is None or text == "{}":
        return {}
    value = orjson.loads(text)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def read_parquet(path: str | os.PathLike[str]) -> Iterator[PairRecord]:
    """Yield the records of a pairs Parquet file (schema checked; ValueError on bad rows)."""
    pa = _pyarrow()
    try:
        handle = pa.parquet.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"{path}: not a readable Parquet file: {exc}") from exc
    expected = _schema()
    got = handle.schema_arrow
    optional = {f.name for f in _descriptor_fields()}
    present = [f.name for f in expected if got.get_field_index(f.name) >= 0]
    missing = [
        f.name
        for f in expected
        if (got.get_field_index(f.name) < 0 and f.name not in optional)
        or (got.get_field_index(f.name) >= 0 and not got.field(f.name).type.equals(f.type))
    ]
    if missing:
        raise ValueError(
            f"{path}: not a mirrorgate pairs file: column(s) {missing} missing or mistyped"
        )
    row0 = 0
    for batch in handle.iter_batches(batch_size=BATCH, columns=present):
        yield from _batch_records(path, batch, row0)
        row0 += batch.num_rows


def _batch_records(path: Any, batch: Any, row0: int) -> list[PairRecord]:
    col = {name: batch.column(i) for i, name in enumerate(batch.schema.names)}
    n = batch.num_rows
    ids = col["id"].to_pylist()
    ts = col["ts"].to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~np.isfinite(ts))
    if bad.size:
        raise ValueError(f"{path}: row {row0 + int(bad[0]) + 1}: ts: expected a finite number")
    sides: dict[str, tuple[list[Any], list[Any], list[Any]]] = {}
    descriptors: dict[str, list[tuple[Any, Any, Any]] | None] = {}
    for side in SIDES:
        scalar = [bool(x) for x in col[f"{side}_scalar"].to_pylist()]
        outputs = _outputs(col[f"{side}_output"], scalar, f"{path}: {side}_output")
        strings = col.get(f"{side}_strings")
        if strings is not None and strings.null_count < n:
            for i, texts in enumerate(strings.to_pylist()):
                if texts is not None:
                    outputs[i] = np.array(texts, dtype=object)
        sides[side] = (
            outputs,
            col[f"{side}_latency_ms"].to_pylist(),
            col[f"{side}_error"].to_pylist(),
        )
        descriptors[side] = _descriptors(col, side, n)
    slices = col["slices"].to_pylist()
    features = col["features"].to_pylist()
    labels = col["label"].to_pylist()
    digests = col["inputs_digest"].to_pylist()
    stages = col["stage"].to_pylist()
    served = col["served_by"].to_pylist()
    ch_out, ch_lat, ch_err = sides["champion"]
    ca_out, ca_lat, ca_err = sides["candidate"]
    for i, rid in enumerate(ids):
        if not rid:
            raise ValueError(f"{path}: row {row0 + i + 1}: id: expected a non-empty string")
    if any(by not in ("champion", "candidate", None) for by in served):
        i = next(i for i, by in enumerate(served) if by not in ("champion", "candidate", None))
        raise ValueError(f"{path}: row {row0 + i + 1}: served_by: expected champion or candidate")
    try:
        sl = [_members(x) for x in slices]
        fe = [_members(x) for x in features]
        lab = [None if x is None else orjson.loads(x) for x in labels]
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise ValueError(
            f"{path}: rows {row0 + 1}-{row0 + n}: slices/features/label: {exc}"
        ) from exc
    # One comprehension per batch: no generator frame per record.
    records = [
        PairRecord(
            id=ids[i],
            ts=t,
            champion=ModelResult(ch_out[i], ch_lat[i], ch_err[i]),
            candidate=ModelResult(ca_out[i], ca_lat[i], ca_err[i]),
            slices=sl[i],
            features=fe[i],
            label=lab[i],
            inputs_digest=digests[i] or "",
            stage=stages[i] or "shadow",
            served_by=served[i] or "champion",
        )
        for i, t in enumerate(ts.tolist())
    ]
    for side in SIDES:
        desc = descriptors[side]
        if desc is not None:
            for record, (name, datatype, shape) in zip(records, desc, strict=True):
                res = getattr(record, side)
                res.name, res.datatype, res.shape = name, datatype, shape
    return records


def _descriptors(col: dict[str, Any], side: str, n: int) -> list[tuple[Any, Any, Any]] | None:
    """Per row (name, datatype, shape) of one side; None when the file has none at all."""
    names, dtypes, shapes = (col.get(f"{side}_{c}") for c in ("output_name", "datatype", "shape"))
    if names is None or dtypes is None or shapes is None:
        return None
    if names.null_count == dtypes.null_count == shapes.null_count == n:
        return None
    return [
        (a, b, None if s is None else tuple(s))
        for a, b, s in zip(names.to_pylist(), dtypes.to_pylist(), shapes.to_pylist(), strict=True)
    ]
