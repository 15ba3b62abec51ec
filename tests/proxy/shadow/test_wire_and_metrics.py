"""The hand-off's framing and the live/worker metrics merge (pure functions)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import ProxyMetrics
from proxy.shadow import wire
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
