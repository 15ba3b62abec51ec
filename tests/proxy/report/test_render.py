"""The HTML page: self-contained, escaped, every section and plot present."""

from __future__ import annotations

import itertools
import re
from html import escape
from html.parser import HTMLParser
from typing import Any

import numpy as np

from proxy.protocol.base import ModelIdentity
from proxy.report import render_html, validate_document
from proxy.report.sections import collect_versions, identity_dict, latency_section
from proxy.report.svg import nice_ticks

EVIL = '<script>alert("x")</script>'


class _Collector(HTMLParser):
    """Start tags with their attributes, and whether the page parsed as balanced SVG."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def with_class(self, tag: str, cls: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and cls in a.get("class", "").split()]


def _parse(page: str) -> _Collector:
    collector = _Collector()
    collector.feed(page)
    return collector


def test_every_section_and_plot_is_rendered(sample_doc: dict[str, Any]) -> None:
    page = render_html(sample_doc)
    tags = _parse(page)
    sections = {a.get("id") for t, a in tags.tags if t == "section"}
    assert {
        "verdict",
        "summary",
        "signoffs",
        "gates",
        "metric",
        "slices",
        "drift",
        "latency",
        "pinned",
        "timeline",
        "reproduce",
    } <= sections
    assert len(tags.with_class("svg", "plot-band")) == len(sample_doc["metric_series"])
    bands = tags.with_class("polygon", "band")
    assert len(bands) == 2
    n_points = len(sample_doc["metric_series"][0]["points"])
    assert len(bands[0]["points"].split()) == 2 * n_points  # upper edge then lower edge
    assert len(tags.with_class("polyline", "estimate")) == 2
    assert len(tags.with_class("line", "interval")) == len(sample_doc["slice_table"]["rows"])
    assert len(tags.with_class("line", "interval-fail")) == 1
    psi_bars = [a for a in tags.with_class("rect", "bar") if "bar-fail" in a["class"]]
    assert len(psi_bars) == 1  # hour_of_day over its PSI threshold
    assert len(tags.with_class("rect", "bar-champion")) > 10
    assert len(tags.with_class("rect", "bar-candidate")) > 10
    assert 'class="verdict-word">ABORT<' in page
    assert "platform=android" in page.split('id="verdict"')[1].split("</section>")[0]
    # Every gate row, grouped by family (one collapsible table each, a header row each),
    # the method named once per family rather than on every row.
    gates_html = page.split('id="gates"')[1].split("</section>")[0]
    families = {g["kind"] for g in sample_doc["gates"]}
    assert gates_html.count("<details") == len(families)
    assert gates_html.count("<tr>") == len(sample_doc["gates"]) + len(families)
    for g in sample_doc["gates"]:
        assert escape(g["method"]) in gates_html
    for method in {g["method"] for g in sample_doc["gates"]}:
        same = {g["kind"] for g in sample_doc["gates"] if g["method"] == method}
        assert gates_html.count(escape(method)) == len(same)
    assert "confidence: the level of the anytime-valid test" in gates_html
    # Failing gates first.
    assert gates_html.index("status-fail") < gates_html.index("status-pass")


def test_page_is_self_contained(sample_doc: dict[str, Any]) -> None:
    page = render_html(sample_doc)
    for forbidden in ("<script", "<link", "<img", "<iframe", "@import", "url(http"):
        assert forbidden not in page
    assert not re.search(r"\bsrc\s*=", page)
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert hrefs and all(h.startswith("#") for h in hrefs)


def test_untrusted_text_is_escaped(sample_doc: dict[str, Any]) -> None:
    sample_doc["gates"][0]["slice"] = f"platform={EVIL}"
    sample_doc["slice_table"]["rows"][1]["value"] = EVIL
    sample_doc["pinned"]["harvested"][0]["slices"] = {"platform": EVIL}
    sample_doc["timeline"][2]["who"] = EVIL
    sample_doc["verdict"]["reason"] = f"failed on {EVIL}"
    sample_doc["metric_series"][0]["slice"] = EVIL
    sample_doc["drift"][0]["feature"] = '"><svg onload=alert(1)>'
    sample_doc["signoffs"] = [
        {"reviewer": EVIL, "decision": "approve", "note": EVIL, "ts": 1.0, "digest": "a" * 64}
    ]
    validate_document(sample_doc)
    page = render_html(sample_doc)
    assert "<script" not in page
    assert "onload=alert" not in page.replace("onload=alert(1)&gt;", "")
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert '"><svg' not in page
    tags = _parse(page)
    assert not [t for t, _ in tags.tags if t == "script"]
    assert all("onload" not in a for _, a in tags.tags)


def test_sparse_document_renders(sample_doc: dict[str, Any]) -> None:
    """A rollout that just started: no labels, no series, no drift, no pinned set."""
    sample_doc.update(gates=[], metric_series=[], drift=[], timeline=[], signoffs=[])
    sample_doc["slice_table"]["rows"] = []
    sample_doc["pinned"] = {"gate": None, "harvested": [], "harvested_total": 0, "pinned_total": 0}
    sample_doc["verdict"] = {
        "verdict": "continue",
        "reason": "collecting evidence",
        "ts": None,
        "decided_at": None,
    }
    for role in ("champion", "candidate"):
        sample_doc["latency"][role] = {"n": 0, "quantiles": []}
    page = render_html(sample_doc)
    assert 'class="verdict-word">CONTINUE<' in page
    assert "the pinned gate did not run" in page
    assert "no decision yet" in page


def test_latency_section_shares_bins_and_counts_everything() -> None:
    rng = np.random.default_rng(3)
    ch = rng.lognormal(1.0, 0.4, 2000)
    ca = np.concatenate([rng.lognormal(1.2, 0.4, 1990), [500.0] * 10])  # a far tail
    section = latency_section(ch, ca, bins=30)
    assert section["champion"]["histogram"]["edges"] == section["candidate"]["histogram"]["edges"]
    assert sum(section["champion"]["histogram"]["counts"]) == 2000
    assert sum(section["candidate"]["histogram"]["counts"]) == 2000
    assert section["candidate"]["histogram"]["counts"][-1] >= 10  # tail kept in the last bin
    p100 = next(q for q in section["candidate"]["quantiles"] if q["q"] == 1.0)
    assert p100["value"] == 500.0


def test_helpers_produce_valid_members(sample_doc: dict[str, Any]) -> None:
    versions = collect_versions()
    assert {
        "python",
        "mirrorgate",
        "numpy",
        "scipy",
        "onnxruntime",
        "torch",
        "sqlalchemy",
        "aiohttp",
    } <= set(versions)
    assert versions["numpy"] == np.__version__
    ident = ModelIdentity(name="m", kind="onnx", digest="d" * 64, extra={"opset": "17"})
    sample_doc["versions"] = versions
    sample_doc["models"]["champion"] = identity_dict(ident)
    sample_doc["latency"] = latency_section([1.0, 2.0, 3.0], [1.5, 2.5, 3.5], bins=4)
    validate_document(sample_doc)


def test_nice_ticks_are_round_and_cover_the_range() -> None:
    assert [round(t, 9) for t in nice_ticks(0, 1)] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ticks = nice_ticks(-0.137, 0.081)
    assert ticks[0] >= -0.137 and ticks[-1] <= 0.081
    assert 0.0 in ticks
    steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
    assert len(steps) == 1 and steps.pop() in (0.01, 0.02, 0.05, 0.1)
