"""``X`` frames: a pass-through pair as raw bytes on the hand-off, no pickle.

Round trips against the job the live path builds (exchange_decoder), the decoded pair
against the same job decoded in-process, and hostile payloads: every truncation, stray
bytes, lengths and counts past the end, bad flags, bad UTF-8. A bad frame raises
``FrameError`` (the worker counts it ``bad_job``), never anything else.
"""

from __future__ import annotations

import pickle
import random
import struct
from typing import Any

import numpy as np
import pytest

from proxy.backends.http import Reply
from proxy.dataplane.mirror import CallOutcome, _Job
from proxy.dataplane.passthrough import ExchangeDecoder, exchange_decoder
from proxy.dataplane.slicing import ParameterSlices
from proxy.protocol.codec import (
    HEADER_LENGTH,
    encode_infer_request,
    encode_infer_response,
    parse_infer_request,
)
from proxy.shadow import wire


def _exchange_job(
    *,
    served_by: str = "champion",
    binary: bool = True,
    slices: dict[str, str] | None = None,
    headers: tuple[tuple[str, str], ...] = (("traceparent", "00-ab-cd-01"),),
    keys: tuple[str, ...] = ("tenant",),
    offload: bool = False,
    features: int = 8,
) -> _Job:
    x = np.arange(features, dtype=np.float32).reshape(1, features)
    body, hl = encode_infer_request(
        {"x": x}, request_id="req-1", parameters={"tenant": "acme"}, binary=binary
    )
    # binary: the answer follows the request's binary outputs; JSON otherwise
    request = parse_infer_request(body, None if hl is None else str(hl)) if binary else None
    out, out_hl = encode_infer_response(
        {"probs": np.full((1, 3), 0.25, np.float32)}, model_name="m", request=request
    )
    reply_headers: list[tuple[str, str]] = [("Content-Type", "application/octet-stream")]
    if out_hl is not None:
        reply_headers.append((HEADER_LENGTH, str(out_hl)))
    reply = Reply(200, "OK", tuple(reply_headers), out)
    decode = exchange_decoder(
        body, None if hl is None else str(hl), reply, ParameterSlices(keys), "", len(body)
    )
    todo = "candidate" if served_by == "champion" else "champion"
    job = _Job(
        "req-1",
        1234.5,
        {},
        dict(slices if slices is not None else {"region": "eu"}),
        "shadow",
        served_by,  # type: ignore[arg-type]
        CallOutcome(None, 0.0042),
        todo,  # type: ignore[arg-type]
        len(body) + len(out),
        decode=decode,
        decode_offload=offload,
    )
    job.headers = headers
    return job


def _fields(job: _Job) -> tuple[object, ...]:
    assert isinstance(job.decode, ExchangeDecoder)
    d = job.decode
    return (
        job.request_id,
        job.ts,
        job.slices,
        job.stage,
        job.served_by,
        job.live.latency_s,
        job.live.outputs,
        job.live.error,
        job.todo,
        job.nbytes,
        job.outputs,
        job.headers,
        job.decode_offload,
        d.body,
        d.header_length,
        d.coding,
        d.limit,
        d.reply_body,
        d.reply_encoding,
        d.reply_header_length,
        d.parameter_slices,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"binary": False},
        {"served_by": "candidate", "offload": True},
        {"slices": {}, "headers": (), "keys": ()},
        # a header aiohttp decoded with surrogateescape, non-ASCII slice values
        {"headers": (("x-raw", "caf\udce9"), ("x-b", "b")), "slices": {"city": "Zürich"}},
    ],
)
def test_an_exchange_round_trips_to_the_same_job(kwargs: dict[str, object]) -> None:
    job = _exchange_job(**kwargs)  # type: ignore[arg-type]
    payload = wire.encode_exchange(job)
    assert payload is not None
    got = wire.ExchangeReader().decode(payload)
    assert _fields(got) == _fields(job)
    # and it is smaller than the pickle it replaces
    assert len(payload) < len(pickle.dumps((job, None), protocol=pickle.HIGHEST_PROTOCOL))


def test_the_decoded_exchange_builds_the_pair_the_in_process_job_builds() -> None:
    here, there = (
        _exchange_job(),
        wire.ExchangeReader().decode(wire.encode_exchange(_exchange_job()) or b""),
    )
    for job in (here, there):
        assert job.decode is not None
        job.decode(job)
    assert list(there.inputs) == ["x"] and np.array_equal(there.inputs["x"], here.inputs["x"])
    assert there.slices == here.slices == {"region": "eu", "tenant": "acme"}
    assert there.live.outputs is not None and here.live.outputs is not None
    assert np.array_equal(there.live.outputs["probs"], here.live.outputs["probs"])
    assert there.outputs == here.outputs and there.nbytes == here.nbytes


def test_jobs_that_are_not_plain_exchanges_are_left_to_pickle() -> None:
    decoded = _exchange_job()
    decoded.inputs = {"x": np.zeros((1, 2), np.float32)}
    assert wire.encode_exchange(decoded) is None
    with_outputs = _exchange_job()
    with_outputs.outputs = ["probs"]
    assert wire.encode_exchange(with_outputs) is None
    closure = _exchange_job()
    assert isinstance(closure.decode, ExchangeDecoder)
    closure.decode.parameter_slices = lambda parameters: {}
    assert wire.encode_exchange(closure) is None
    plain = _Job(
        "r",
        0.0,
        {"x": np.zeros(2)},
        {},
        "shadow",
        "champion",
        CallOutcome(None, 0.1),
        "candidate",
        8,
    )
    assert wire.encode_exchange(plain) is None


def test_every_truncation_and_any_stray_byte_is_a_frame_error() -> None:
    payload = wire.encode_exchange(_exchange_job())
    assert payload is not None
    reader = wire.ExchangeReader()
    for cut in range(len(payload)):
        with pytest.raises(wire.FrameError):
            reader.decode(payload[:cut])
    with pytest.raises(wire.FrameError):
        reader.decode(payload + b"\0")


def test_hostile_lengths_counts_flags_and_text_are_frame_errors() -> None:
    payload = wire.encode_exchange(_exchange_job())
    assert payload is not None
    fixed = wire._FIXED
    ts, lat, nbytes, limit, flags, ns, nh, nk = fixed.unpack_from(payload)
    rest = payload[fixed.size :]
    reader = wire.ExchangeReader()
    hostile = [
        # counts that claim more entries than the frame holds
        fixed.pack(ts, lat, nbytes, limit, flags, 0xFFFF, nh, nk) + rest,
        fixed.pack(ts, lat, nbytes, limit, flags, ns, nh, 0xFFFF) + rest,
        # unknown flag bits, an unknown "todo" code
        fixed.pack(ts, lat, nbytes, limit, 0x80, ns, nh, nk) + rest,
        fixed.pack(ts, lat, nbytes, limit, 3 << 2, ns, nh, nk) + rest,
        # the request id's length past the end; a required field marked absent
        payload[: fixed.size] + struct.pack(">I", 1 << 30) + rest[4:],
        payload[: fixed.size] + struct.pack(">I", 0xFFFFFFFF) + rest[4:],
    ]
    # the request id's bytes made invalid UTF-8
    (rid_len,) = struct.unpack_from(">I", rest)
    count = 8 + 2 * (ns + nh) + nk
    start = fixed.size + 4 * count
    hostile.append(payload[:start] + b"\xff" * rid_len + payload[start + rid_len :])
    for bad in hostile:
        with pytest.raises(wire.FrameError):
            reader.decode(bad)
    rng = random.Random(7)
    for _ in range(300):  # random corruption: a FrameError or a job, nothing else
        data = bytearray(payload)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            reader.decode(bytes(data))
        except wire.FrameError:
            pass


class _Sink:
    def __init__(self) -> None:
        self.records: list[Any] = []

    def submit(self, record: Any) -> bool:
        self.records.append(record)
        return True

    async def aclose(self) -> None:
        return None


async def test_the_worker_takes_good_frames_and_counts_bad_ones_as_bad_job() -> None:
    from prometheus_client import CollectorRegistry

    from proxy.core.metrics import ProxyMetrics
    from proxy.dataplane.mirror import MirrorDispatcher
    from proxy.dataplane.slicing import Slicer
    from proxy.dataplane.state import ProxyState
    from proxy.shadow.worker import WorkerHub
    from tests.faults.helpers import until
    from tests.proxy.conftest import N_FEATURES, NumpyBackend, make_config
    from tests.proxy.upstream import UpstreamModel

    config = make_config("http://127.0.0.1:9", "http://127.0.0.1:9")
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    sink = _Sink()
    model = UpstreamModel(N_FEATURES, 3, 1)
    state = ProxyState(
        config=config,
        registry=registry,
        metrics=metrics,
        slicer=Slicer(config.slices, config.features),
        sinks=[sink],
    )
    state.mirror = MirrorDispatcher(
        champion=NumpyBackend(model),
        candidate=NumpyBackend(model),
        config=config,
        sinks=[sink],
        metrics=metrics,
    )
    hub = WorkerHub(state, "http://127.0.0.1:1")

    def count(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    good = wire.encode_exchange(_exchange_job(features=N_FEATURES))
    assert good is not None
    hub.take(wire.EXCHANGE, good)
    await until(lambda: len(sink.records) == 1, "the pair recorded")
    record = sink.records[0]
    assert record.id == "req-1" and record.candidate.error is None
    assert record.slices == {"region": "eu", "tenant": "acme"}
    for bad in (good[:-1], good + b"x", b"", b"\0" * 80):
        hub.take(wire.EXCHANGE, bad)
    hub.take(wire.JOB, b"not a pickle")
    assert count("mirrorgate_shadow_dropped_total", reason="bad_job") == 5
    assert count("mirrorgate_shadow_handoff_taken_total") == 1
    assert len(sink.records) == 1
