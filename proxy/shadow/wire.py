"""Frames on the hand-off socket between a live process and the shadow worker.

Every frame is ``length (u32, big-endian) | kind (1 byte) | payload``. Live -> worker:

* ``X`` exchanges: a pass-through pair (a remote champion or canary candidate answered
  the client; :func:`proxy.dataplane.passthrough.exchange_decoder`) as a compact,
  length-framed record of its raw material: the request body bytes, its coding and
  binary header length, the answer's body bytes, encoding and header length, the
  request id, timestamp, latency, stage, slices, the client's end-to-end headers and the
  parameter-slice keys (:func:`encode_exchange`). No Python object is pickled: encoding
  is a few ``struct.pack`` calls and one join on the live path, decoding slices a
  ``memoryview`` in the worker (issue 11: pickling each ``(job, other)`` cost ~40 us a
  side, and once carried a whole ``Slicer``).
* ``J`` jobs: any other job (a pickled ``(job, other)`` pair of :mod:`proxy.dataplane.mirror`
  objects: decoded inputs of an in-process champion, a canary fallback carrying both
  outcomes). Rare with a remote champion; kept general.

Worker -> live: ``A`` acks (cumulative jobs and payload bytes taken in since the
connection opened, two u64) and ``S`` state (JSON: canary weight, stage, candidate
stopped, worker ready, control-plane URL).

The socket lives in a private (0700) directory of the serving user: pickle is safe there
because only that user's processes can connect. An ``X`` frame is still checked as if
it were hostile (every length against the frame, text as UTF-8): a bad one raises
:class:`FrameError` and the worker counts the job ``bad_job``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from proxy.dataplane.mirror import CallOutcome, Role, _Job
from proxy.dataplane.passthrough import ExchangeDecoder
from proxy.dataplane.slicing import ParameterSlices

HEADER = struct.Struct(">IB")
ACK = struct.Struct(">QQ")
JOB = ord("J")
EXCHANGE = ord("X")
ACK_KIND = ord("A")
STATE = ord("S")
METRICS = ord("M")  # a live process's metric exposition (server.workers > 1)


def frame(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), kind) + payload


class FrameReader:
    """Splits a byte stream into ``(kind, payload)`` frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        # Usually no partial frame waits: the frames are sliced from ``data`` itself
        # (one copy each), not appended to the buffer and copied out of it twice.
        buf: bytes | bytearray = data
        if self._buf:
            self._buf += data
            buf = self._buf
        offset = 0
        size = len(buf)
        while size - offset >= HEADER.size:
            length, kind = HEADER.unpack_from(buf, offset)
            end = offset + HEADER.size + length
            if end > size:
                break
            yield kind, bytes(buf[offset + HEADER.size : end])
            offset = end
        if buf is self._buf:
            if offset:
                del self._buf[:offset]
        elif offset < size:
            self._buf += buf[offset:]


# ---------------------------------------------------------------- exchange frames
#
# ``fixed | lengths | fields``: the fixed part (ts, live latency, nbytes, decode limit,
# flags, and how many slices, headers and parameter-slice keys follow), then one u32
# length per field (``_NONE`` for an absent text), then the fields' bytes in order:
# request id, stage, coding, header length, reply encoding, reply header length,
# request body, reply body, slices (key, value)..., headers (key, value)..., keys...
# One ``unpack_from`` reads every length: decoding is slicing, not a walk of calls.

_FIXED = struct.Struct(">ddQQBHHH")
_NONE = 0xFFFFFFFF
_SCALARS = 8  # the fields before the slices
_OPTIONAL = (3, 4, 5)  # the fields that may be absent
_SERVED_CANDIDATE = 0x01
_OFFLOAD = 0x02
_TODO_SHIFT = 2  # 2 bits: 0 nothing left, 1 candidate, 2 champion
_FLAGS = _SERVED_CANDIDATE | _OFFLOAD | (3 << _TODO_SHIFT)
_TODO: tuple[Role | None, ...] = (None, "candidate", "champion")
_TODO_CODE = {role: code for code, role in enumerate(_TODO)}
_MAX_ENTRIES = 0xFFFF
_tables: dict[int, struct.Struct] = {}


def _table(n: int) -> struct.Struct:
    table = _tables.get(n)
    if table is None:
        table = _tables[n] = struct.Struct(f">{n}I")
    return table


class FrameError(ValueError):
    """A frame that does not decode (truncated, a length past its end, bad UTF-8)."""


def _utf8(value: str) -> bytes:
    # surrogatepass: a header aiohttp decoded with surrogateescape round-trips exactly
    return value.encode("utf-8", "surrogatepass")


def encode_exchange(job: _Job) -> bytes | None:
    """A pass-through job as an ``X`` payload, or None when it is not one (pickle it).

    Only a job whose whole content is raw material qualifies: decoded by an
    :class:`ExchangeDecoder` whose slices come from :class:`ParameterSlices`, nothing
    decoded yet, the served side's outcome a latency only (the other side's outcome,
    when known, travels pickled)."""
    decode = job.decode
    if (
        type(decode) is not ExchangeDecoder
        or type(decode.parameter_slices) is not ParameterSlices
        or job.inputs
        or job.outputs is not None
        or job.live.outputs is not None
        or job.live.error is not None
    ):
        return None
    keys = decode.parameter_slices.keys
    if max(len(job.slices), len(job.headers), len(keys)) > _MAX_ENTRIES:
        return None
    flags = _TODO_CODE[job.todo] << _TODO_SHIFT
    if job.served_by == "candidate":
        flags |= _SERVED_CANDIDATE
    if job.decode_offload:
        flags |= _OFFLOAD
    fields: list[bytes | None] = [
        _utf8(job.request_id),
        _utf8(job.stage),
        _utf8(decode.coding),
        None if decode.header_length is None else _utf8(decode.header_length),
        None if decode.reply_encoding is None else _utf8(decode.reply_encoding),
        None if decode.reply_header_length is None else _utf8(decode.reply_header_length),
        decode.body,
        decode.reply_body,
    ]
    for key, value in job.slices.items():
        fields += (_utf8(key), _utf8(value))
    for key, value in job.headers:
        fields += (_utf8(key), _utf8(value))
    fields += [_utf8(key) for key in keys]
    lengths = [_NONE if f is None else len(f) for f in fields]
    fixed = _FIXED.pack(
        job.ts,
        job.live.latency_s,
        job.nbytes,
        decode.limit,
        flags,
        len(job.slices),
        len(job.headers),
        len(keys),
    )
    return b"".join([fixed, _table(len(fields)).pack(*lengths), *(f for f in fields if f)])


class ExchangeReader:
    """Decodes ``X`` payloads into jobs (the worker's side of :func:`encode_exchange`)."""

    def __init__(self) -> None:
        # The parameter-slice keys are the same config for every job: one object each.
        self._slices: dict[tuple[str, ...], ParameterSlices] = {}

    def decode(self, payload: bytes) -> _Job:
        size = len(payload)
        if size < _FIXED.size:
            raise FrameError(f"truncated exchange frame: {size} bytes")
        ts, latency, nbytes, limit, flags, n_slices, n_headers, n_keys = _FIXED.unpack_from(payload)
        if flags & ~_FLAGS or (flags >> _TODO_SHIFT) >= len(_TODO):
            raise FrameError(f"unknown flags {flags:#x} in an exchange frame")
        count = _SCALARS + 2 * (n_slices + n_headers) + n_keys
        pos = _FIXED.size + 4 * count
        if pos > size:
            raise FrameError(f"truncated exchange frame: {count} lengths in {size} bytes")
        lengths = _table(count).unpack_from(payload, _FIXED.size)
        raw: list[bytes | None] = []
        for i, length in enumerate(lengths):
            if length == _NONE and i in _OPTIONAL:
                raw.append(None)
                continue
            end = pos + length
            if end > size:
                raise FrameError(f"truncated exchange frame: field {i} ends past {size} bytes")
            raw.append(payload[pos:end])
            pos = end
        if pos != size:
            raise FrameError(f"{size - pos} stray bytes after an exchange frame")
        try:
            texts = [
                None if r is None else r.decode("utf-8", "surrogatepass")
                for i, r in enumerate(raw)
                if i not in (6, 7)
            ]
        except UnicodeDecodeError as exc:
            raise FrameError("a text field of an exchange frame is not UTF-8") from exc
        rid, stage, coding, header_length, reply_encoding, reply_length = texts[:6]
        assert rid is not None and stage is not None and coding is not None
        rest = texts[6:]
        cut = 2 * n_slices
        slices = dict(zip(rest[0:cut:2], rest[1:cut:2], strict=True))
        hcut = cut + 2 * n_headers
        headers = tuple(zip(rest[cut:hcut:2], rest[cut + 1 : hcut : 2], strict=True))
        keys = tuple(rest[hcut:])
        parameter_slices = self._slices.get(keys)  # type: ignore[arg-type]
        if parameter_slices is None:
            if len(self._slices) > 64:  # bounded, whatever a peer sends
                self._slices.clear()
            parameter_slices = self._slices[keys] = ParameterSlices(keys)  # type: ignore[index,arg-type]
        body, reply_body = raw[6], raw[7]
        assert body is not None and reply_body is not None
        decoder = ExchangeDecoder(
            body,
            header_length,
            coding,
            limit,
            reply_body,
            reply_encoding,
            reply_length,
            parameter_slices,
        )
        job = _Job(
            rid,
            ts,
            {},
            slices,  # type: ignore[arg-type]
            stage,
            "candidate" if flags & _SERVED_CANDIDATE else "champion",
            CallOutcome(None, latency),
            _TODO[flags >> _TODO_SHIFT],
            nbytes,
            decode=decoder,
            decode_offload=bool(flags & _OFFLOAD),
        )
        job.headers = headers  # type: ignore[assignment]
        return job
