"""The hand-off: framing, the live side's bounds and drop counts, and the metrics merge."""

from __future__ import annotations

import asyncio
import pickle
import random
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.core.config import ShadowSettings
from proxy.core.metrics import ProxyMetrics
from proxy.dataplane.mirror import CallOutcome, _Job
from proxy.shadow import wire
from proxy.shadow.live import FLUSH_JOBS, ShadowChannel
from proxy.shadow.metrics_merge import merge_exposition


def test_frames_survive_any_split_of_the_stream() -> None:
    frames = [(wire.JOB, b"a" * n) for n in (0, 1, 5, 300)] + [(wire.ACK_KIND, b"xyz")]
    stream = b"".join(wire.frame(kind, payload) for kind, payload in frames)
    for step in (1, 2, 3, 7, len(stream)):
        reader = wire.FrameReader()
        got = []
        for i in range(0, len(stream), step):
            got += list(reader.feed(stream[i : i + step]))
        assert got == frames
    # random cuts: reads that end inside a header, inside a payload, on a boundary,
    # several frames at once (sliced from the read itself) after a partial one
    rng = random.Random(3)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 6)))
        reader = wire.FrameReader()
        got = []
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            got += list(reader.feed(stream[a:b]))
        assert got == frames and not reader._buf


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_counters_are_summed_and_gauges_are_the_workers() -> None:
    live_registry, worker_registry = CollectorRegistry(), CollectorRegistry()
    live, worker = ProxyMetrics(live_registry), ProxyMetrics(worker_registry)
    live.observe_call("champion", 200, 0.002)
    live.observe_call("champion", 200, 0.004)
    live.shadow_dropped.labels(reason="handoff_full").inc(3)
    worker.observe_call("candidate", 200, 0.003)
    worker.shadow_dropped.labels(reason="handoff_full").inc(2)
    worker.shadow_dropped.labels(reason="queue_full").inc(1)
    live.rollout_canary_weight.set(0.0)
    worker.rollout_canary_weight.set(0.25)
    worker.shadow_queue_depth.set(7)

    merged = _samples(
        merge_exposition(generate_latest(live_registry), generate_latest(worker_registry))
    )
    total = "mirrorgate_proxy_requests_total"
    assert merged[(total, (("code", "200"), ("role", "champion")))] == 2
    assert merged[(total, (("code", "200"), ("role", "candidate")))] == 1
    dropped = "mirrorgate_shadow_dropped_total"
    assert merged[(dropped, (("reason", "handoff_full"),))] == 5
    assert merged[(dropped, (("reason", "queue_full"),))] == 1
    assert merged[("mirrorgate_rollout_canary_weight", ())] == 0.25
    assert merged[("mirrorgate_shadow_queue_depth", ())] == 7
    count = "mirrorgate_proxy_request_duration_seconds_count"
    assert merged[(count, (("role", "champion"),))] == 2
    # histogram buckets are summed too: the merged histogram is still cumulative
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in merged.items()
        if name == "mirrorgate_proxy_request_duration_seconds_bucket"
        and dict(labels)["role"] == "champion"
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert buckets[-1][1] == 2


class _Transport:
    """Stands in for the Unix socket transport (no worker needed to test the bounds):
    records each write and the frames it carried."""

    def __init__(self) -> None:
        self.writes = 0
        self.frames: list[bytes] = []
        self.kinds: list[int] = []
        self._reader = wire.FrameReader()

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.writes += 1
        for kind, payload in self._reader.feed(data):
            assert kind in (wire.JOB, wire.EXCHANGE)
            self.kinds.append(kind)
            self.frames.append(payload)


async def _next_iteration() -> None:
    """Let the loop run the callbacks scheduled so far (the channel's flush)."""
    await asyncio.sleep(0)


def _channel(**settings: int) -> tuple[ShadowChannel, ProxyMetrics, _Transport]:
    metrics = ProxyMetrics(CollectorRegistry())
    channel = ShadowChannel("/nonexistent", ShadowSettings(**settings))
    channel.metrics = metrics
    transport = _Transport()
    channel._connected(transport)  # type: ignore[arg-type]
    return channel, metrics, transport


def _job(i: int, payload: Any = None) -> _Job:
    outcome = CallOutcome({"y": np.zeros((1, 2), np.float32)}, 0.001)
    x = np.full((1, 4), i, np.float32)
    job = _Job(f"r{i}", 0.0, {"x": x}, {}, "shadow", "champion", outcome, "candidate", 16)
    if payload is not None:
        job.slices = payload
    return job


def _dropped(metrics: ProxyMetrics, reason: str) -> float:
    return (
        metrics.registry.get_sample_value("mirrorgate_shadow_dropped_total", {"reason": reason})
        or 0.0
    )


async def test_the_handoff_bounds_outstanding_jobs_and_acks_free_room() -> None:
    channel, metrics, transport = _channel(handoff_max_jobs=3)
    for i in range(5):
        channel.submit(_job(i), None)
    assert channel.outstanding == 3 and _dropped(metrics, "handoff_full") == 2
    await _next_iteration()
    assert len(transport.frames) == 3
    channel._acked(2, 0)  # the worker took two in
    channel.submit(_job(5), None)
    await _next_iteration()
    assert len(transport.frames) == 4 and channel.outstanding == 2
    # what was written is the job, readable on the other side
    job, other = pickle.loads(transport.frames[-1])
    assert job.request_id == "r5" and other is None
    assert np.array_equal(job.inputs["x"], np.full((1, 4), 5, np.float32))


async def test_the_first_job_is_written_at_once_the_rest_of_the_iteration_together() -> None:
    channel, _, transport = _channel()
    for i in range(10):
        channel.submit(_job(i), None)
    # the first goes out at once (the worker starts on it while the client is
    # answered); the other nine wait for the end of the loop iteration
    assert transport.writes == 1 and len(transport.frames) == 1
    assert channel.outstanding == 10
    await _next_iteration()
    # one more write for the nine, in order, each its own frame
    assert transport.writes == 2
    assert [pickle.loads(p)[0].request_id for p in transport.frames] == [f"r{i}" for i in range(10)]
    await _next_iteration()
    channel.submit(_job(10), None)  # a new iteration: written at once again
    assert transport.writes == 3 and len(transport.frames) == 11


async def test_the_write_buffer_is_bounded_within_one_iteration() -> None:
    channel, _, transport = _channel()
    for i in range(FLUSH_JOBS + 2):
        channel.submit(_job(i), None)
    # the first at once, then FLUSH_JOBS buffered ones forced out, one still buffered
    assert transport.writes == 2 and len(transport.frames) == FLUSH_JOBS + 1
    await _next_iteration()
    assert transport.writes == 3 and len(transport.frames) == FLUSH_JOBS + 2


async def test_the_byte_bound_drops_at_write_time_and_counts() -> None:
    size = len(pickle.dumps((_job(0), None), protocol=pickle.HIGHEST_PROTOCOL))
    channel, metrics, transport = _channel(handoff_max_bytes=2 * size + size // 2)
    for i in range(3):
        channel.submit(_job(i), None)
    await _next_iteration()
    assert len(transport.frames) == 2 and _dropped(metrics, "handoff_bytes") == 1
    assert channel.outstanding == 2  # the dropped one is not waiting for an ack


async def test_a_job_that_cannot_be_pickled_is_dropped_never_raised() -> None:
    channel, metrics, transport = _channel()
    channel.submit(_job(0, payload={"bad": lambda: None}), None)  # type: ignore[dict-item]
    channel.submit(_job(1), None)
    await _next_iteration()
    assert [pickle.loads(p)[0].request_id for p in transport.frames] == ["r1"]
    assert _dropped(metrics, "unpicklable") == 1 and channel.outstanding == 1


async def test_jobs_lost_with_the_worker_are_counted() -> None:
    channel, metrics, transport = _channel()
    for i in range(4):
        channel.submit(_job(i), None)
    await _next_iteration()
    channel._acked(1, 0)
    channel.submit(_job(4), None)  # written at once
    channel.submit(_job(5), None)  # still buffered when the worker goes
    channel._disconnected()
    assert _dropped(metrics, "worker_down") == 5
    await _next_iteration()
    assert len(transport.frames) == 5  # the buffered one was never written
    channel.submit(_job(9), None)  # no worker connected now
    assert _dropped(metrics, "worker_down") == 6


async def test_pass_through_pairs_go_as_exchange_frames_the_rest_pickled() -> None:
    from tests.proxy.shadow.test_exchange_frames import _exchange_job

    channel, metrics, transport = _channel()
    exchange = _exchange_job()
    channel.submit(exchange, None)
    channel.submit(_job(1), None)  # decoded inputs: pickled
    channel.submit(_exchange_job(), CallOutcome(None, 0.2, "timeout: x", "timeout"))
    await _next_iteration()
    assert transport.kinds == [wire.EXCHANGE, wire.JOB, wire.JOB]
    assert wire.ExchangeReader().decode(transport.frames[0]).request_id == "req-1"
    assert pickle.loads(transport.frames[1])[0].request_id == "r1"
    job, other = pickle.loads(transport.frames[2])
    assert other.reason == "timeout" and job.request_id == "req-1"
    # the byte accounting counts each frame's payload, whatever its kind
    assert channel._sent_bytes == sum(len(f) for f in transport.frames)
    assert channel.outstanding == 3 and _dropped(metrics, "unpicklable") == 0


async def test_an_exchange_with_fields_of_another_type_is_pickled_not_dropped() -> None:
    from tests.proxy.shadow.test_exchange_frames import _exchange_job

    channel, metrics, transport = _channel()
    odd = _exchange_job()
    assert odd.decode is not None
    odd.decode.header_length = b"12"  # type: ignore[attr-defined]  # bytes, not text
    channel.submit(odd, None)
    await _next_iteration()
    assert transport.kinds == [wire.JOB]
    job, other = pickle.loads(transport.frames[0])
    assert job.decode.header_length == b"12" and other is None
    assert _dropped(metrics, "unpicklable") == 0 and channel.outstanding == 1
