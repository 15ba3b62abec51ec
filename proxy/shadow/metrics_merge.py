"""Merge Prometheus text expositions (live processes' and the shadow worker's).

Both processes register the same families (``ProxyMetrics``): the live one counts the
champion's calls and the hand-off's drops, the worker the candidate's calls, its own
drops, the gates and the recorder. Counters and histograms are summed sample by sample
(each process counts disjoint events); gauges take the last text's value that has one:
the worker's, given last (it owns the queue, the stage and the weight; the live copy
mirrors them).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

_SUMMED = {"counter", "histogram", "summary"}


def merge_exposition(*texts: bytes) -> bytes:
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode("utf-8")):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            merged = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                seen = merged.get(key)
                if seen is None:
                    merged[key] = sample
                elif sample.name.endswith("_created"):
                    merged[key] = seen._replace(value=min(seen.value, sample.value))
                elif family.type in _SUMMED:
                    merged[key] = seen._replace(value=seen.value + sample.value)
                else:
                    merged[key] = sample
    for name, family in families.items():
        family.samples = list(values[name].values())

    class _Merged:
        def collect(self) -> Iterator[Metric]:
            yield from families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)
