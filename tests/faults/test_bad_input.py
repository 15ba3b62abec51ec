"""Malformed V2 requests against a running proxy: a 4xx with a message, no crash, no pair.

One proxy (real app, real V2 upstreams) serves on loopback from a background thread for
the whole module, so the corpus and the hypothesis-generated bodies hit the same server
one after the other: it must answer every one with a 4xx and ``{"error": <message>}``,
keep serving good requests, never call a model for a rejected request, and record a pair
only for requests it answered 200. (tests/proxy/server/test_app.py covers the first dozen classic
cases with their exact messages; this module adds the rest and the fuzzing.)
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocol.codec import HEADER_LENGTH
from proxy.server.app import create_app, wait_loaded
from storage.sink import MemorySink
from tests.faults.helpers import TOKEN
from tests.proxy.conftest import N_CLASSES, N_FEATURES, NumpyBackend, make_config
from tests.proxy.upstream import Upstream, UpstreamModel

INFER = "/v2/models/classifier/infer"
MAX_BODY = 1 << 20


@dataclass
class Served:
    base: str
    champion: NumpyBackend
    sink: MemorySink
    loop: asyncio.AbstractEventLoop

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        url = urlsplit(self.base)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def post_json(
        self, path: str, doc: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        return self.request(
            "POST",
            path,
            json.dumps(doc).encode(),
            {"Content-Type": "application/json", **(headers or {})},
        )


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}
    stop = asyncio.Event()

    async def main() -> None:
        runners = []
        try:
            urls = []
            ups = []
            for seed in (1, 2):
                upstream = Upstream(UpstreamModel(N_FEATURES, N_CLASSES, seed), seed=seed)
                runner = web.AppRunner(upstream.app(), access_log=None)
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", 0).start()
                runners.append(runner)
                urls.append("http://{}:{}".format(*runner.addresses[0][:2]))
                ups.append(upstream)
            config = make_config(
                urls[0],
                urls[1],
                server={"max_body_bytes": MAX_BODY, "control_token": TOKEN},
                mirror={"timeout_ms": 5000},
            )
            sink = MemorySink()
            # In-process champion: mirrorgate is the server and judges the input (in front
            # of a remote champion the champion judges it:
            # tests/proxy/dataplane/test_passthrough.py).
            champion = NumpyBackend(ups[0].model)
            app = create_app(config, sinks=[sink], champion=champion)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            runners.append(runner)
            await wait_loaded(app)
            box["served"] = Served(
                "http://{}:{}".format(*runner.addresses[0][:2]), champion, sink, loop
            )
            started.set()
            await stop.wait()
        finally:
            for runner in reversed(runners):
                await runner.cleanup()
            started.set()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(60) and "served" in box, "proxy did not start"
    try:
        yield box["served"]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


def _good(i: int) -> dict[str, Any]:
    x = np.random.default_rng(i).normal(size=(1, N_FEATURES)).astype(np.float32)
    return {
        "id": f"good{i}",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, N_FEATURES], "data": x.ravel().tolist()}
        ],
    }


def _tensor(**over: Any) -> bytes:
    t = {"name": "x", "datatype": "FP32", "shape": [1, N_FEATURES], "data": [0.5] * N_FEATURES}
    t.update(over)
    t = {k: v for k, v in t.items() if v is not _DROP}
    return json.dumps({"inputs": [t]}).encode()


_DROP = object()


def _binary(
    header: dict[str, Any], data: bytes, header_length: str | None = None
) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + data, {
        HEADER_LENGTH: header_length if header_length is not None else str(len(head))
    }


def _bytes_tensor(
    data: bytes, shape: list[int], size: int | None = None
) -> tuple[bytes, dict[str, str]]:
    header = {
        "inputs": [
            {
                "name": "x",
                "datatype": "BYTES",
                "shape": shape,
                "parameters": {"binary_data_size": len(data) if size is None else size},
            }
        ]
    }
    return _binary(header, data)


def _with_id_raw(raw_id: bytes) -> bytes:
    doc = _good(0)
    del doc["id"]
    return b'{"id": ' + raw_id + b", " + json.dumps(doc).encode()[1:]


def _corpus() -> list[tuple[str, bytes, dict[str, str], str]]:
    """(case, body, headers, a word the error message must contain)"""
    good = json.dumps(_good(0)).encode()
    fp32 = np.zeros(N_FEATURES, dtype=np.float32).tobytes()
    binary_x = {
        "name": "x",
        "datatype": "FP32",
        "shape": [1, N_FEATURES],
        "parameters": {"binary_data_size": len(fp32)},
    }
    cases: list[tuple[str, bytes, dict[str, str], str]] = [
        ("empty body", b"", {}, ""),
        ("truncated json", good[: len(good) // 2], {}, "json"),
        ("truncated json end", good[:-1], {}, "json"),
        ("top level is a list", b"[1, 2, 3]", {}, ""),
        ("top level is a string", b'"infer"', {}, ""),
        ("inputs not a list", json.dumps({"inputs": {"x": 1}}).encode(), {}, "inputs"),
        ("no inputs", json.dumps({"id": "a"}).encode(), {}, "inputs"),
        ("empty inputs", json.dumps({"inputs": []}).encode(), {}, ""),
        ("input not an object", json.dumps({"inputs": [1]}).encode(), {}, ""),
        ("name not a string", _tensor(name=7), {}, "name"),
        ("missing name", _tensor(name=_DROP), {}, "name"),
        ("datatype not a string", _tensor(datatype=3), {}, "datatype"),
        ("shape a string", _tensor(shape="1,4"), {}, "shape"),
        ("shape with a float", _tensor(shape=[1.5, 4]), {}, "shape"),
        ("negative shape", _tensor(shape=[-1, N_FEATURES]), {}, "shape"),
        ("shape with a bool", _tensor(shape=[True, N_FEATURES]), {}, "shape"),
        ("data a string", _tensor(data="0.5 0.5"), {}, ""),
        ("data with strings", _tensor(data=["a"] * N_FEATURES), {}, ""),
        ("data with null", _tensor(data=[None] * N_FEATURES), {}, ""),
        ("data with an object", _tensor(data=[{"v": 1}] * N_FEATURES), {}, ""),
        ("ragged nested data", _tensor(data=[[0.5, 0.5], [0.5]]), {}, ""),
        ("too many elements", _tensor(data=[0.5] * (N_FEATURES + 1)), {}, "elements"),
        ("huge declared shape", _tensor(shape=[10**12, 10**12]), {}, ""),
        ("huge declared shape int overflow", _tensor(shape=[2**70, N_FEATURES]), {}, ""),
        ("missing data", _tensor(data=_DROP), {}, "data"),
        ("id not a string", json.dumps({**_good(0), "id": 5}).encode(), {}, "id"),
        (
            "outputs not a list",
            json.dumps({**_good(0), "outputs": "probs"}).encode(),
            {},
            "outputs",
        ),
        (
            "parameters not an object",
            json.dumps({**_good(0), "parameters": [1]}).encode(),
            {},
            "parameters",
        ),
        (
            "invalid utf-8 in a name",
            b'{"inputs": [{"name": "\xff\xfe", "datatype": "FP32"}]}',
            {},
            "utf-8",
        ),
        ("id with a lone surrogate", _with_id_raw(b'"\\ud800"'), {}, "unicode"),
        (
            "bytes json data with a lone surrogate",
            json.dumps(
                {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["\ud800"]}]}
            ).encode(),
            {},
            "",
        ),
        (
            "deeply nested data",
            _tensor().replace(b'"data": [', b'"data": ' + b"[" * 5000) + b"]" * 4999,
            {},
            "",
        ),
        (
            "header length not a number",
            *_binary({"inputs": [binary_x]}, fp32, "abc"),
            HEADER_LENGTH.lower(),
        ),
        ("header length negative", *_binary({"inputs": [binary_x]}, fp32, "-5"), ""),
        ("header length zero", *_binary({"inputs": [binary_x]}, fp32, "0"), ""),
        ("header length cuts the json", *_binary({"inputs": [binary_x]}, fp32, "10"), ""),
        (
            "binary size larger than sent",
            *_binary({"inputs": [{**binary_x, "parameters": {"binary_data_size": 10**9}}]}, fp32),
            "",
        ),
        (
            "binary size negative",
            *_binary({"inputs": [{**binary_x, "parameters": {"binary_data_size": -4}}]}, fp32),
            "",
        ),
        (
            "binary size not matching the shape",
            *_binary({"inputs": [{**binary_x, "parameters": {"binary_data_size": 8}}]}, fp32[:8]),
            "",
        ),
        (
            "binary size a string",
            *_binary({"inputs": [{**binary_x, "parameters": {"binary_data_size": "16"}}]}, fp32),
            "",
        ),
        (
            "binary data and json data both",
            *_binary({"inputs": [{**binary_x, "data": [0.5] * N_FEATURES}]}, fp32),
            "",
        ),
        ("bytes: truncated length prefix", *_bytes_tensor(b"\x05\x00", [1]), "bytes"),
        (
            "bytes: length past the data",
            *_bytes_tensor(struct.pack("<I", 1000) + b"abc", [1]),
            "bytes",
        ),
        ("bytes: huge length", *_bytes_tensor(struct.pack("<I", 2**32 - 1) + b"abc", [1]), "bytes"),
        (
            "bytes: more elements than the shape",
            *_bytes_tensor(struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b", [1]),
            "bytes",
        ),
        (
            "bytes: fewer elements than the shape",
            *_bytes_tensor(struct.pack("<I", 1) + b"a", [3]),
            "bytes",
        ),
        ("bytes tensor for an fp32 input", *_bytes_tensor(struct.pack("<I", 1) + b"a", [1]), ""),
    ]
    return cases


CORPUS = _corpus()


@pytest.mark.parametrize(
    ("body", "headers", "word"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS]
)
def test_malformed_request_is_a_4xx_with_a_message(
    served: Served, body: bytes, headers: dict[str, str], word: str
) -> None:
    started = served.champion.stats.started
    status, raw = served.request("POST", INFER, body, headers)
    assert 400 <= status < 500, (status, raw[:300])
    error = json.loads(raw)["error"]
    assert isinstance(error, str) and error.strip()
    assert word in error.lower(), error
    assert served.champion.stats.started == started  # no model ran


def _nonfinite(token: str) -> bytes:
    data = ", ".join(["0.5"] * (N_FEATURES - 1) + [token])
    return b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, %d], "data": [%s]}]}' % (
        N_FEATURES,
        data.encode(),
    )


def _gzip(raw: bytes) -> bytes:
    import gzip

    return gzip.compress(raw)


GOOD = json.dumps(_good(0)).encode()
# (case, body, headers, status, a word the message must contain): the boundary rules of
# docs/faults.md "Input hygiene", each with its exact status.
HOSTILE: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("id with CR LF", _with_id_raw(b'"a\\r\\nX-Forged: 1"'), {}, 400, "printable"),
    ("id with NUL", _with_id_raw(b'"a\\u0000b"'), {}, 400, "printable"),
    ("id with ESC", _with_id_raw(b'"\\u001b[31mred"'), {}, 400, "printable"),
    ("header length superscript two", *_binary(_good(0), b"", "\u00b2"), 400, "ascii digits"),
    ("header length 5000 digits", *_binary(_good(0), b"", "9" * 5000), 400, "5000 digits"),
    ("NaN in data", _nonfinite("NaN"), {}, 400, "non-finite"),
    ("Infinity in data", _nonfinite("Infinity"), {}, 400, "non-finite"),
    ("-Infinity in data", _nonfinite("-Infinity"), {}, 400, "non-finite"),
    ("1e999 in data", _nonfinite("1e999"), {}, 400, "infinity"),
    (
        "empty batch",
        json.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, N_FEATURES], "data": []}]}
        ).encode(),
        {},
        400,
        "empty batch",
    ),
    ("unknown coding", GOOD, {"Content-Encoding": "x-bogus"}, 415, "content-encoding"),
    ("two codings", _gzip(GOOD), {"Content-Encoding": "gzip, gzip"}, 415, "content-encoding"),
    ("gzip that is not gzip", GOOD, {"Content-Encoding": "gzip"}, 400, "gzip"),
    ("deflate that is not deflate", GOOD, {"Content-Encoding": "deflate"}, 400, "deflate"),
    # Decodes to twice server.max_body_bytes from a few KiB: refused, memory bounded.
    (
        "gzip bomb",
        _gzip(GOOD[:-1] + b" " * (2 * MAX_BODY) + b"}"),
        {"Content-Encoding": "gzip"},
        413,
        "too large",
    ),
]


@pytest.mark.parametrize(
    ("body", "headers", "status", "word"),
    [c[1:] for c in HOSTILE],
    ids=[c[0] for c in HOSTILE],
)
def test_hostile_request_gets_its_exact_status_and_no_model_runs(
    served: Served, body: bytes, headers: dict[str, str], status: int, word: str
) -> None:
    started = served.champion.stats.started
    recorded = len(served.sink.records)
    got, raw = served.request("POST", INFER, body, headers)
    assert got == status, (got, raw[:300])
    error = json.loads(raw)["error"]
    assert word in error.lower(), error
    assert served.champion.stats.started == started  # no model ran
    assert len(served.sink.records) == recorded


def test_good_gzip_body_is_served(served: Served) -> None:
    status, raw = served.request(
        "POST", INFER, _gzip(json.dumps(_good(5)).encode()), {"Content-Encoding": "gzip"}
    )
    assert status == 200, raw


def test_declared_length_over_the_limit_is_413_before_the_body(served: Served) -> None:
    # Only the head is sent: the answer cannot depend on reading the body.
    url = urlsplit(served.base)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {2**31}\r\n\r\n".encode()
        )
        head = _read_head(sock)
    assert head.startswith(b"HTTP/1.1 413"), head


@pytest.mark.parametrize(
    ("length", "expect", "status"),
    [(2**31, "100-continue", b"413"), (100, "something-else", b"417")],
)
def test_expect_over_the_limit_is_refused_not_continued(
    served: Served, length: int, expect: str, status: bytes
) -> None:
    started = served.champion.stats.started
    url = urlsplit(served.base)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
            f"Expect: {expect}\r\n\r\n".encode()
        )
        head = _read_head(sock)
    assert head.startswith(b"HTTP/1.1 " + status), head
    assert b"100 Continue" not in head
    assert served.champion.stats.started == started


def test_expect_within_the_limit_continues_and_is_served(served: Served) -> None:
    url = urlsplit(served.base)
    body = json.dumps(_good(6)).encode()
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode()
        )
        assert _read_head(sock).startswith(b"HTTP/1.1 100")
        sock.sendall(body)
        assert _read_head(sock).startswith(b"HTTP/1.1 200")


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_huge_body_is_refused_without_reading_it_all(served: Served) -> None:
    status, raw = served.request("POST", INFER, b"{" + b" " * (2 * MAX_BODY), {})
    assert status == 413 and "max_body_bytes" in json.loads(raw)["error"]


# Text includes lone surrogates (category Cs, off by default): JSON can carry them.
any_text = st.text(st.characters(exclude_categories=()), max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
tensors = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "y", ""]) | any_text,
        "datatype": st.sampled_from(["FP32", "FP64", "INT64", "BYTES", "BOOL", "FP99"]),
        "shape": st.lists(st.integers(-3, 10**13), max_size=4) | json_values,
        "data": json_values | st.lists(st.floats(allow_nan=False, width=32), max_size=10),
    },
    optional={
        "parameters": st.dictionaries(st.sampled_from(["binary_data_size", "x"]), json_values)
    },
)
v2_bodies = st.fixed_dictionaries(
    {"inputs": st.lists(tensors, max_size=3) | json_values},
    optional={"id": json_values, "outputs": json_values, "parameters": json_values},
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(doc=v2_bodies)
def test_generated_v2_documents_never_crash_the_server(served: Served, doc: dict[str, Any]) -> None:
    _check_any(served, json.dumps(doc).encode(), {"Content-Type": "application/json"})


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=st.binary(max_size=600),
    header_length=st.none()
    | st.integers(-10, 700).map(str)
    | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=4),
)
def test_generated_raw_bodies_never_crash_the_server(
    served: Served, body: bytes, header_length: str | None
) -> None:
    headers = {} if header_length is None else {HEADER_LENGTH: header_length}
    _check_any(served, body, headers)


def _check_any(served: Served, body: bytes, headers: dict[str, str]) -> None:
    started = served.champion.stats.started
    status, raw = served.request("POST", INFER, body, headers)
    if status == 200:  # generated by chance as a valid request: it was served
        assert served.champion.stats.started == started + 1
        return
    assert 400 <= status < 500, (status, raw[:300], body[:200])
    error = json.loads(raw)["error"]
    assert isinstance(error, str) and error.strip()
    assert served.champion.stats.started == started


def test_still_serving_and_only_answered_requests_were_recorded(served: Served) -> None:
    # Runs after the corpus and the generated bodies (module order): the server is
    # alive, and the pairs it recorded are exactly those of requests it answered 200.
    for i in range(3):
        status, raw = served.post_json(INFER, _good(i))
        assert status == 200, raw
    answered = served.champion.stats.started

    async def drained() -> int:
        for _ in range(500):
            if len(served.sink.records) >= answered:
                break
            await asyncio.sleep(0.02)
        return len(served.sink.records)

    count = asyncio.run_coroutine_threadsafe(drained(), served.loop).result(30)
    assert count == answered
    assert {f"good{i}" for i in range(3)} <= {r.id for r in served.sink.records}
