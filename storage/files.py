"""Paired-record and label files (JSON Lines, DESIGN.md): read, validate, write.

``read_pairs(path)`` yields ``PairRecord``s, ``read_labels(path)`` yields
``(id, label, ts or None)``; both raise ``ValueError("<path>:<line>: <what>")`` on the
first bad line. Blank lines are skipped. ``-`` means stdin/stdout; a ``.gz`` name is
gzip. ``write_pairs`` writes to a temporary file beside the target and renames it at
the end, so a failed export never leaves half a file.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import io
import itertools
import json
import math
import operator
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from gates.columns import Descriptor, PairColumns
from gates.records import Label, ModelResult, PairRecord

PathLike = str | os.PathLike[str]


def _open_text(path: PathLike) -> IO[str]:
    if str(path) == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8")
    try:
        if str(path).endswith(".gz"):
            return gzip.open(path, "rt", encoding="utf-8")
        return open(path, encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot open: {exc.strerror or exc}") from exc


def _open_bytes(path: PathLike) -> IO[bytes]:
    if str(path) == "-":
        return sys.stdin.buffer
    try:
        if str(path).endswith(".gz"):
            return gzip.open(path, "rb")  # type: ignore[return-value]
        return open(path, "rb", buffering=1 << 20)
    except OSError as exc:
        raise ValueError(f"{path}: cannot open: {exc.strerror or exc}") from exc


def _json_lines(path: PathLike) -> Iterator[tuple[int, Any]]:
    # Bytes and orjson (UTF-8 is validated by orjson itself): JSON parsing is what a
    # replay spends most of its time on.
    fh = _open_bytes(path)
    loads = orjson.loads
    try:
        lineno = 0
        while True:
            try:
                line = fh.readline()
            except (OSError, EOFError) as exc:
                raise ValueError(f"{path}:{lineno + 1}: cannot read: {exc}") from exc
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            try:
                yield lineno, loads(line)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from exc
    finally:
        if str(path) != "-":
            fh.close()


def read_pairs(path: PathLike) -> Iterator[PairRecord]:
    """Yield the records of a paired-record file, validating each line.

    The fast path (replay reads millions of lines): orjson parses each line, and the
    outputs of a chunk of lines become one float64 matrix per side, so each record's
    output is a row view instead of an array built from a Python list (the per-record
    ``np.asarray`` then costs nothing). Validation is ``PairRecord.from_dict``'s, line by
    line, unchanged; a chunk whose outputs are not one rectangular numeric block (mixed
    lengths, nulls, bad values) takes the plain per-line path, which reports the line.
    """
    if str(path).endswith(".parquet"):
        from storage.columnar import read_parquet

        yield from read_parquet(path)
        return
    chunk: list[tuple[int, Any]] = []
    for item in _json_lines(path):
        chunk.append(item)
        if len(chunk) >= _CHUNK:
            yield from _records(path, chunk)
            chunk = []
    if chunk:
        yield from _records(path, chunk)


_CHUNK = 4096


def _stack_outputs(chunk: list[tuple[int, Any]], side: str) -> None:
    """Replace ``side.output`` lists in place by rows of one matrix, when they form one."""
    try:
        rows = [data[side]["output"] for _, data in chunk]
        if rows and all(type(r) is list for r in rows):
            matrix = np.array(rows, dtype=np.float64)
            if matrix.ndim != 2:
                return
        elif rows and all(type(r) is float or type(r) is int for r in rows):
            matrix = np.array(rows, dtype=np.float64)
        else:
            return
    except (TypeError, KeyError, ValueError):
        return  # not a uniform block: from_dict checks every line and names the bad one
    for (_, data), row in zip(chunk, matrix, strict=True):
        data[side]["output"] = row


def _records(path: PathLike, chunk: list[tuple[int, Any]]) -> Iterator[PairRecord]:
    _stack_outputs(chunk, "champion")
    _stack_outputs(chunk, "candidate")
    from_dict = PairRecord.from_dict
    for lineno, data in chunk:
        record = _plain(data)
        if record is not None:
            yield record
            continue
        try:
            yield from_dict(data, where="record")
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: {exc}") from exc


_KEYS = frozenset(
    ["id", "ts", "slices", "features", "champion", "candidate", "label", "inputs_digest",
     "stage", "served_by"]
)  # fmt: skip
_SIDE_KEYS = frozenset(("output", "latency_ms", "error", "output_name", "datatype", "shape"))
_NUMBER = (int, float)


def _side(data: Any) -> ModelResult | None:
    if type(data) is not dict or not _SIDE_KEYS.issuperset(data):
        return None
    out = data.get("output")
    lat = data.get("latency_ms")
    err = data.get("error")
    if (
        (out is not None and type(out) is not np.ndarray)
        or (lat is not None and type(lat) not in _NUMBER)
        or (err is not None and type(err) is not str)
    ):
        return None
    name, datatype, shape = data.get("output_name"), data.get("datatype"), data.get("shape")
    if (
        (name is not None and type(name) is not str)
        or (datatype is not None and type(datatype) is not str)
        or (shape is not None and (type(shape) is not list or not _dims(shape)))
    ):
        return None
    return ModelResult(
        output=out,
        latency_ms=None if lat is None else float(lat),
        error=err,
        name=name,
        datatype=datatype,
        shape=None if shape is None else tuple(shape),
    )


def _dims(shape: list[Any]) -> bool:
    return all(type(d) is int and d >= 0 for d in shape)


def _plain_maps(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A line's ``slices`` and ``features`` when their types are exact (string slice
    values; float, int or string features), else None (the general parser decides)."""
    slices = data.get("slices") or {}
    features = data.get("features") or {}
    if type(slices) is not dict or type(features) is not dict:
        return None
    for v in slices.values():
        if type(v) is not str:
            return None
    for v in features.values():
        if type(v) is not float and type(v) is not int and type(v) is not str:
            return None
    return slices, features


def _plain(data: Any) -> PairRecord | None:
    """The record, when the line is in the plain shape the exporter writes (exact types,
    known keys, outputs already stacked); None sends it through ``PairRecord.from_dict``,
    which validates everything and names the field. Same result either way
    (tests/storage/test_columnar.py), this one without from_dict's per-field messages."""
    if type(data) is not dict or not _KEYS.issuperset(data):
        return None
    rid, ts = data.get("id"), data.get("ts")
    if type(rid) is not str or not rid or type(ts) is not float or not math.isfinite(ts):
        return None
    maps = _plain_maps(data)
    if maps is None:
        return None
    slices, features = maps
    served = data.get("served_by", "champion")
    stage = data.get("stage")
    digest = data.get("inputs_digest")
    if (
        (served != "champion" and served != "candidate")
        or (stage is not None and type(stage) is not str)
        or (digest is not None and type(digest) is not str)
    ):
        return None
    champion = _side(data.get("champion"))
    candidate = _side(data.get("candidate"))
    if champion is None or candidate is None:
        return None
    return PairRecord(
        id=rid,
        ts=ts,
        champion=champion,
        candidate=candidate,
        slices=slices,
        features=features,
        label=data.get("label"),
        inputs_digest=digest or "",
        stage=stage or "shadow",
        served_by=served,
    )


# ------------------------------------------------------------ columns for replay

_SERVED = ("champion", "candidate")


def _fast_side(data: Any) -> tuple[Any, Any, Descriptor] | None:
    """(output, latency, descriptor) of a side in the column shape: answered without an
    error, the output a non-empty list not starting with a string (BYTES is an object
    array in a record) or a number; None sends the line to the record parser."""
    # unknown keys are ignored, as the record parser ignores them
    if type(data) is not dict or data.get("error") is not None:
        return None
    out = data.get("output")
    t = type(out)
    if t is list:
        if not out or type(out[0]) is str:
            return None
    elif t is not float and t is not int:
        return None
    lat = data.get("latency_ms")
    if lat is not None and type(lat) is not float and type(lat) is not int:
        return None
    name, datatype, shape = data.get("output_name"), data.get("datatype"), data.get("shape")
    if (name is not None and type(name) is not str) or (
        datatype is not None and type(datatype) is not str
    ):
        return None
    if shape is not None:
        if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
            return None
        shape = tuple(shape)
    return out, lat, (name, datatype, shape)


def _fast_row(data: Any) -> tuple[Any, ...] | None:
    """The line's values when it is in the column shape (every field's type exact, so
    the record parser would accept it and build the same values); else None."""
    if type(data) is not dict:
        return None
    rid, ts = data.get("id"), data.get("ts")
    if type(rid) is not str or not rid:
        return None
    if (type(ts) is not float and type(ts) is not int) or not math.isfinite(ts):
        return None
    maps = _plain_maps(data)
    if maps is None:
        return None
    slices, features = maps
    if data.get("served_by", "champion") not in _SERVED:
        return None
    ch = _fast_side(data.get("champion"))
    if ch is None:
        return None
    ca = _fast_side(data.get("candidate"))
    if ca is None:
        return None
    width_ch = len(ch[0]) if type(ch[0]) is list else -1
    width_ca = len(ca[0]) if type(ca[0]) is list else -1
    key = (width_ch, ch[2], width_ca, ca[2])
    return key, rid, float(ts), slices, features, data.get("label"), ch, ca


def _matrix(outputs: list[Any], width: int) -> np.ndarray:
    """``(n, width)`` float64 from lists of ``width`` values (``(n,)`` from numbers)."""
    n = len(outputs)
    try:  # one pass over the values (no per-row array); None, a string: np.array decides
        if width < 0:
            return np.fromiter(outputs, dtype=np.float64, count=n)
        flat = itertools.chain.from_iterable(outputs)
        return np.fromiter(flat, dtype=np.float64, count=n * width).reshape(n, width)
    except (TypeError, ValueError):
        return np.array(outputs, dtype=np.float64)


def _columns(rows: list[tuple[Any, ...]]) -> PairColumns | None:
    """One block of rows sharing widths and descriptors; None when the outputs are not
    one numeric matrix per side (then the record parser judges each line)."""
    key = rows[0][0]
    try:
        champion = _matrix([r[6][0] for r in rows], key[0])
        candidate = _matrix([r[7][0] for r in rows], key[2])
    except (TypeError, ValueError):
        return None
    if champion.ndim != (1 if key[0] < 0 else 2) or candidate.ndim != (1 if key[2] < 0 else 2):
        return None  # nested lists: the record parser names the line
    return PairColumns(
        ids=[r[1] for r in rows],
        ts=np.array([r[2] for r in rows], dtype=np.float64),
        champion=champion,
        candidate=candidate,
        # None becomes NaN in a float array
        champion_latency=np.array([r[6][1] for r in rows], dtype=np.float64),
        candidate_latency=np.array([r[7][1] for r in rows], dtype=np.float64),
        slices=[r[3] for r in rows],
        features=[r[4] for r in rows],
        labels=[r[5] for r in rows],
        champion_desc=key[1],
        candidate_desc=key[3],
    )


def read_pair_blocks(path: PathLike) -> Iterator[PairColumns | list[PairRecord]]:
    """The pairs of a file in order, as blocks: :class:`PairColumns` for runs of lines in
    the column shape (gates/columns.py), records for the rest. Lazy: a block is read when
    the consumer asks for it (replay stops reading at its decision). Validation is the
    record parser's: a line that is not in the column shape goes through
    ``PairRecord.from_dict`` and a bad one raises ``ValueError("<path>:<line>: ...")``
    when the reading gets there. Parquet yields records, a batch at a time."""
    if str(path).endswith(".parquet"):
        from storage.columnar import read_parquet

        batch: list[PairRecord] = []
        for record in read_parquet(path):
            batch.append(record)
            if len(batch) >= _CHUNK:
                yield batch
                batch = []
        if batch:
            yield batch
        return
    fh = _open_bytes(path)
    try:
        lineno = 0
        while True:
            # A chunk's parse allocates some 100k small containers, none in a cycle,
            # that live until the chunk's columns are built: the collector's passes over
            # them cost as much as the parse itself, so it waits for the chunk (never
            # across a yield: the consumer's code runs with the collector on).
            collecting = gc.isenabled()
            gc.disable()
            try:
                try:
                    lines = fh.readlines(_CHUNK_BYTES)
                except (OSError, EOFError) as exc:
                    raise ValueError(f"{path}:{lineno + 1}: cannot read: {exc}") from exc
                blocks = _chunk_blocks(path, _parse_lines(path, lines, lineno))
            finally:
                if collecting:
                    gc.enable()
            lineno += len(lines)
            yield from blocks
            if not lines:
                return
    finally:
        if str(path) != "-":
            fh.close()


# About 160 lines of a 10-class file. Small on purpose: a chunk is checked a column at
# a time, several passes over its fresh objects, which stay in the CPU cache at this
# size (64 KB read parsed 2x faster per line than 1 MB in a side-by-side run).
_CHUNK_BYTES = 1 << 16


def _parse_lines(path: PathLike, lines: list[bytes], lineno: int) -> list[tuple[int, Any]]:
    """``(line number, parsed)`` of the non-blank lines; ValueError names a bad one."""
    loads = orjson.loads
    try:  # the usual chunk: no blank line, every line valid
        return [(lineno + i, loads(line)) for i, line in enumerate(lines, 1)]
    except orjson.JSONDecodeError:
        pass
    out: list[tuple[int, Any]] = []
    for i, line in enumerate(lines, lineno + 1):
        if not line.strip():
            continue
        try:
            out.append((i, loads(line)))
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not valid JSON: {exc.msg}") from exc
    return out


_NONE = type(None)
_NUMBERS = frozenset((float, int))
_LATENCY = frozenset((float, int, _NONE))
_FEATURE = frozenset((float, int, str))
_TEXT_OR_NONE = frozenset((str, _NONE))


def _field(docs: list[dict[str, Any]], key: str) -> list[Any]:
    """``[d.get(key) for d in docs]`` without a bytecode step per line."""
    return list(map(dict.get, docs, itertools.repeat(key)))


def _or_empty(values: list[Any]) -> list[Any]:
    """``v or {}`` per value (a fresh ``{}`` each: records do not share one)."""
    if values.count(None) or not all(values):
        return [v or {} for v in values]
    return values


# The members the exporter always writes, fetched in one C-level pass over a chunk's
# lines (one pass: a pass per member costs a cache miss per line each time). A line
# without one of them, or with more, takes the line-by-line path or a second look.
_TOP = operator.itemgetter("id", "ts", "slices", "features", "champion", "candidate", "label")
_SIDE = operator.itemgetter("output", "latency_ms", "error")


def _whole_side(sides: list[Any], n: int) -> tuple[np.ndarray, np.ndarray, Descriptor] | None:
    """One side of a whole chunk as columns, judged a field at a time (C-level type
    sets, no per-line bytecode): the same conditions as :func:`_fast_side` on every
    line, plus one width and one descriptor for the chunk."""
    if set(map(type, sides)) != {dict}:
        return None
    try:
        outs, lats, errors = map(list, zip(*map(_SIDE, sides), strict=True))
    except KeyError:
        return None
    if errors.count(None) != n:
        return None
    kinds = set(map(type, outs))
    if kinds == {list}:
        widths = set(map(len, outs))
        if len(widths) != 1 or 0 in widths:
            return None
        if str in set(map(type, map(operator.itemgetter(0), outs))):
            return None
        width = widths.pop()
    elif kinds <= _NUMBERS:
        width = -1
    else:
        return None
    if not set(map(type, lats)) <= _LATENCY:
        return None
    desc: Descriptor = (None, None, None)
    if sum(map(len, sides)) != 3 * n:  # descriptors (or unknown members, ignored)
        names = _field(sides, "output_name")
        dtypes = _field(sides, "datatype")
        shapes = _field(sides, "shape")
        if not set(map(type, names + dtypes)) <= _TEXT_OR_NONE:  # (hashable, then compared)
            return None
        if len(set(names)) != 1 or len(set(dtypes)) != 1:
            return None
        shape = shapes[0]
        if shape is not None:
            if type(shape) is not list or any(s != shape for s in shapes):
                return None
            if not all(type(d) is int and d >= 0 for d in shape):
                return None
            shape = tuple(shape)
        elif shapes.count(None) != n:
            return None
        desc = (names[0], dtypes[0], shape)
    try:
        matrix = _matrix(outs, width)
    except (TypeError, ValueError):
        return None
    if matrix.ndim != (1 if width < 0 else 2):
        return None
    return matrix, np.array(lats, dtype=np.float64), desc


def _whole_chunk(docs: list[Any]) -> PairColumns | None:
    """A whole chunk as one block, when every line is in the column shape and the chunk
    has one width and descriptor per side (the usual file); None: line by line."""
    n = len(docs)
    if not n or set(map(type, docs)) != {dict}:
        return None
    try:
        cols = list(map(list, zip(*map(_TOP, docs), strict=True)))
    except KeyError:
        return None
    ids, ts_raw, slices, features, chs, cas, labels = cols
    if set(map(type, ids)) != {str} or not all(ids):
        return None
    if not set(map(type, ts_raw)) <= _NUMBERS:
        return None
    try:
        ts = np.array(ts_raw, dtype=np.float64)
    except OverflowError:
        return None
    if not np.isfinite(ts).all():
        return None
    slices, features = _or_empty(slices), _or_empty(features)
    if set(map(type, slices)) != {dict} or set(map(type, features)) != {dict}:
        return None
    chain = itertools.chain.from_iterable
    if not set(map(type, chain(map(dict.values, slices)))) <= {str}:
        return None
    if not set(map(type, chain(map(dict.values, features)))) <= _FEATURE:
        return None
    if sum(map(len, docs)) != 7 * n:  # more members: served_by must be valid
        repeat = itertools.repeat
        served = list(map(dict.get, docs, repeat("served_by"), repeat("champion")))
        if served.count("champion") + served.count("candidate") != n:
            return None
    ch = _whole_side(chs, n)
    if ch is None:
        return None
    ca = _whole_side(cas, n)
    if ca is None:
        return None
    return PairColumns(
        ids=ids,
        ts=ts,
        champion=ch[0],
        candidate=ca[0],
        champion_latency=ch[1],
        candidate_latency=ca[1],
        slices=slices,
        features=features,
        labels=labels,
        champion_desc=ch[2],
        candidate_desc=ca[2],
    )


def _chunk_blocks(
    path: PathLike, chunk: list[tuple[int, Any]]
) -> list[PairColumns | list[PairRecord]]:
    whole = _whole_chunk(list(map(operator.itemgetter(1), chunk)))
    if whole is not None:
        return [whole]
    from_dict = PairRecord.from_dict
    blocks: list[PairColumns | list[PairRecord]] = []
    run: list[tuple[Any, ...]] = []
    run_lines: list[tuple[int, Any]] = []
    slow: list[PairRecord] = []
    for lineno, data in chunk:
        row = _fast_row(data)
        if row is not None and (not run or row[0] == run[0][0]):
            if slow:
                blocks.append(slow)
                slow = []
            run.append(row)
            run_lines.append((lineno, data))
            continue
        if run:
            blocks.append(_block(path, run, run_lines))
            run, run_lines = [], []
        if row is not None:
            run.append(row)
            run_lines.append((lineno, data))
            continue
        try:
            slow.append(from_dict(data, where="record"))
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: {exc}") from exc
    if slow:
        blocks.append(slow)
    if run:
        blocks.append(_block(path, run, run_lines))
    return blocks


def _block(
    path: PathLike, run: list[tuple[Any, ...]], lines: list[tuple[int, Any]]
) -> PairColumns | list[PairRecord]:
    cols = _columns(run)
    if cols is not None:
        return cols
    out: list[PairRecord] = []
    for lineno, data in lines:
        try:
            out.append(PairRecord.from_dict(data, where="record"))
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: {exc}") from exc
    return out


def read_labels(path: PathLike) -> Iterator[tuple[str, Label, float | None]]:
    """Yield ``(id, label, ts)`` from a label file: ``{"id": ..., "label": ..., "ts": ...}``
    per line (``ts`` optional)."""
    for lineno, data in _json_lines(path):
        where = f"{path}:{lineno}"
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object")
        rid = data.get("id")
        if not isinstance(rid, str | int) or isinstance(rid, bool) or rid == "":
            raise ValueError(f"{where}: id: expected a non-empty string")
        if data.get("label") is None:
            raise ValueError(f"{where}: label: missing")
        label = data["label"]
        if not _valid_label(label):
            raise ValueError(f"{where}: label: expected a number, a string or a list of numbers")
        ts = data.get("ts")
        if ts is not None and (
            not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts)
        ):
            raise ValueError(f"{where}: ts: expected a finite number")
        yield str(rid), label, None if ts is None else float(ts)


def _valid_label(label: Any) -> bool:
    if isinstance(label, bool):
        return False
    if isinstance(label, int | float | str):
        return True
    return isinstance(label, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in label
    )


def file_mode() -> int:
    """0666 less the process umask: what ``open()`` would give a new file.

    Files are first written to a ``mkstemp`` file (mode 0600) and renamed into place;
    they get this mode before the rename so CI artefacts and shared volumes can read
    them as they could any other file the user writes. The umask is read from
    /proc/self/status where Linux shows it (setting it to read it is process-wide).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_pairs(path: PathLike, records: Iterable[PairRecord]) -> int:
    """Write records as JSON Lines, or Parquet for a ``.parquet`` name (atomically for a
    file); returns how many."""
    if str(path).endswith(".parquet"):
        from storage.columnar import write_parquet

        return write_parquet(path, records)
    if str(path) == "-":
        n = _write(sys.stdout, records)
        sys.stdout.flush()
        return n
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise ValueError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as raw:
            if target.name.endswith(".gz"):
                with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
                    with io.TextIOWrapper(gz, encoding="utf-8") as text:
                        n = _write(text, records)
            else:
                with io.TextIOWrapper(raw, encoding="utf-8") as text:
                    n = _write(text, records)
        os.chmod(tmp, file_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return n


def _write(fh: IO[str], records: Iterable[PairRecord]) -> int:
    n = 0
    for record in records:
        fh.write(json.dumps(record.to_dict(), separators=(", ", ": ")))
        fh.write("\n")
        n += 1
    return n
