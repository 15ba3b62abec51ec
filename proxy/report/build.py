"""Render a report document into the validation pack: ``report.json`` + ``report.html``.

The page is self-contained: inline CSS, inline SVG charts drawn from the document's
numbers, no scripts, nothing fetched. Every value from the document is escaped.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from proxy.core.errors import BadRequest
from proxy.report import svg
from proxy.report.document import canonical_json, report_digest, validate_document
from proxy.report.signoff import check_all
from storage.files import file_mode

JSON_NAME = "report.json"
HTML_NAME = "report.html"
STATUS_ORDER = {"fail": 0, "inconclusive": 1, "pass": 2}
STATUS_ORDER_NAMES = {v: k for k, v in STATUS_ORDER.items()}


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def fmt_num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10**-(digits):
            return f"{value:.2e}"
        return f"{value:.{digits}g}"
    return str(value)


def fmt_ts(ts: float | None) -> str:
    if ts is None:
        return "—"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_value(value: Any, limit: int = 6) -> str:
    """A label or model output: numbers rounded, long vectors shortened."""
    if value is None:
        return "—"
    if isinstance(value, list):
        shown = [fmt_num(v, 3) if isinstance(v, int | float) else str(v) for v in value[:limit]]
        tail = ", …" if len(value) > limit else ""
        return "[" + ", ".join(shown) + tail + "]"
    if isinstance(value, float):
        return fmt_num(value)
    return json.dumps(value) if not isinstance(value, str) else value


def _status(status: str) -> str:
    return f'<span class="status status-{_e(status)}">{_e(status.upper())}</span>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """Cells are already-escaped HTML; headers are escaped here."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        body = f'<tr><td colspan="{len(headers)}" class="none">none</td></tr>'
    return f'<table class="{_e(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _section(anchor: str, title: str, body: str, note: str = "") -> str:
    intro = f'<p class="note">{note}</p>' if note else ""
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>{intro}{body}</section>'


def _verdict(doc: Mapping[str, Any]) -> str:
    v = doc["verdict"]
    r = doc["rollout"]
    decided = v["decided_at"]
    at = (
        f"after {fmt_num(decided['pairs'])} pairs and {fmt_num(decided['labels'])} labels"
        if decided
        else "no decision yet"
    )
    when = f" at {_e(fmt_ts(v['ts']))}" if v["ts"] is not None else ""
    return (
        f'<section class="verdict verdict-{_e(v["verdict"])}" id="verdict">'
        f'<div class="verdict-word">{_e(v["verdict"].upper())}</div>'
        f'<div><p class="reason">{_e(v["reason"])}</p>'
        f'<p class="when">{_e(at)}{when} · stage {_e(r["stage"])}</p>'
        f"{_at_a_glance(doc)}</div></section>"
    )


def _at_a_glance(doc: Mapping[str, Any]) -> str:
    """One line under the verdict: the blocking cells by status and the advisory failures.

    Cells below their minimum sample size wait without deciding; they are counted apart.
    """
    gates = doc["gates"]
    blocking = [g for g in gates if g.get("blocking", True)]
    small = [
        g
        for g in blocking
        if g["status"] == "inconclusive" and g.get("min_n") is not None and g["n"] < g["min_n"]
    ]
    counts = {k: sum(g["status"] == k for g in blocking) for k in ("pass", "fail", "inconclusive")}
    advisory = [g for g in gates if not g.get("blocking", True) and g["status"] == "fail"]
    parts = [
        f"blocking cells: {counts['pass']} pass, {counts['fail']} fail, "
        f"{counts['inconclusive']} waiting"
        + (f" ({len(small)} below their minimum sample)" if small else "")
    ]
    preset = doc["rollout"].get("preset")
    if preset:
        parts.append(f"preset {preset}")
    line = f'<p class="glance">{_e(" · ".join(parts))}</p>'
    if advisory:
        names = ", ".join(
            g["name"] + ("" if g["slice"] == "all" else f"[{g['slice']}]") for g in advisory
        )
        word = "despite" if doc["verdict"]["verdict"] == "promote" else "also"
        line += (
            f'<p class="advisory-fails">{len(advisory)} advisory '
            f"{'failure' if len(advisory) == 1 else 'failures'} ({word}: evidence only, "
            f"never blocking): {_e(names)}</p>"
        )
    return line


def _summary(doc: Mapping[str, Any], digest: str) -> str:
    r, c, m = doc["rollout"], doc["counts"], doc["models"]
    plan = " → ".join(r.get("plan") or []) or "—"
    items = [
        ("champion", f"{m['champion']['name']} ({m['champion']['kind']})"),
        ("candidate", f"{m['candidate']['name']} ({m['candidate']['kind']})"),
        ("started", fmt_ts(r["started_at"])),
        ("ended", fmt_ts(r.get("ended_at"))),
        ("evidence as of", fmt_ts(r["as_of"])),
        ("plan", plan),
        ("gate preset", r.get("preset") or "—"),
        ("pairs", fmt_num(c["pairs"])),
        ("labels", fmt_num(c["labels"])),
        ("candidate errors", fmt_num(c.get("candidate_errors"))),
        ("champion errors", fmt_num(c.get("champion_errors"))),
        ("shadow dropped", fmt_num(c.get("shadow_dropped"))),
        ("report digest", digest),
    ]
    cells = "".join(
        f'<div class="kv"><span class="k">{_e(k)}</span><span class="v">{_e(v)}</span></div>'
        for k, v in items
    )
    return f'<section id="summary" class="summary">{cells}</section>'


def _signoffs(doc: Mapping[str, Any], digest: str) -> str:
    checks = check_all(doc)
    rows = []
    for chk in checks:
        s = chk.signoff
        mark = (
            '<span class="match">✓ matches this report</span>'
            if chk.matches
            else '<span class="mismatch">✗ MISMATCH: the report changed after this sign-off</span>'
        )
        rows.append(
            [
                _e(s.reviewer),
                f'<span class="decision decision-{_e(s.decision)}">{_e(s.decision)}</span>',
                _e(fmt_ts(s.ts)),
                _e(s.note) or "—",
                f'<code title="{_e(s.digest)}">{_e(s.digest[:16])}…</code>',
                mark,
            ]
        )
    rid = doc["rollout"]["id"]
    note = (
        f"A sign-off records the sha256 of this report's canonical JSON (sign-offs "
        f"excluded): <code>{_e(digest)}</code>. Record one with "
        f"<code>mirrorgate signoff --rollout {_e(rid)} --reviewer NAME --decision "
        f"approve|reject</code>."
    )
    table = _table(
        ["reviewer", "decision", "time", "note", "signed digest", "check"], rows, "signoffs"
    )
    return _section("signoffs", "Sign-offs", table, note)


CONFIDENCE_NOTE = (
    "confidence: the level of the anytime-valid test behind the row's status, 1 - alpha: "
    "for PASS, alpha is the per-gate PASS error (alpha_pass); for FAIL and undecided rows, "
    "alpha is "
    "this cell's share of the rollout's false-abort budget. It is not a probability that "
    "the candidate is good. Empty for evidence-only rows (point estimates)."
)


def _gate_row(g: Mapping[str, Any]) -> list[str]:
    return [
        _e(g["name"]) + ("" if g.get("blocking", True) else ' <span class="tag">advisory</span>'),
        _e(g["slice"]),
        _status(g["status"]),
        _e(fmt_num(g["statistic"])),
        _e(fmt_num(g["threshold"])),
        _e(fmt_num(g["n"]))
        + (
            f' <span class="muted">/ min {_e(fmt_num(g["min_n"]))}</span>'
            if g.get("min_n") is not None
            else ""
        ),
        _e(fmt_num(g["confidence"])),
        _e(g["reason"]),
    ]


def _gates(doc: Mapping[str, Any]) -> str:
    # Grouped by gate family (collapsible, no scripts); the method is named once per
    # family. Inside a family: failing first, blocking before advisory.
    families: dict[str, list[Mapping[str, Any]]] = {}
    for g in doc["gates"]:
        families.setdefault(g.get("kind") or g["name"].split(".")[0], []).append(g)

    def worst(rows: list[Mapping[str, Any]]) -> int:
        return min(STATUS_ORDER[g["status"]] for g in rows)

    headers = ["gate", "slice", "status", "statistic", "threshold", "n", "confidence", "reason"]
    blocks = []
    for family, rows in sorted(families.items(), key=lambda kv: (worst(kv[1]), kv[0])):
        rows = sorted(rows, key=lambda g: (STATUS_ORDER[g["status"]], not g.get("blocking", True)))
        counts = {k: sum(g["status"] == k for g in rows) for k in ("fail", "inconclusive", "pass")}
        methods = ", ".join(dict.fromkeys(g["method"] for g in rows))
        head = _status(STATUS_ORDER_NAMES[worst(rows)])
        summary = (
            f'<summary><span class="family">{_e(family)}</span> {head} '
            f"{counts['fail']} fail · {counts['inconclusive']} undecided · {counts['pass']} pass"
            f' — <span class="method">{_e(methods)}</span></summary>'
        )
        open_ = " open" if counts["fail"] else ""
        table = _table(headers, [_gate_row(g) for g in rows], "gates")
        blocks.append(f'<details class="gate-family"{open_}>{summary}{table}</details>')
    note = (
        "Every gate's evidence, grouped by family (failing families first and open); "
        "the method is named once per family. " + CONFIDENCE_NOTE
    )
    return _section("gates", "Gates", "".join(blocks) or '<p class="none">none</p>', _e(note))


def _series(doc: Mapping[str, Any]) -> str:
    charts = []
    for s in doc["metric_series"]:
        points = [
            svg.BandPoint(p["n"], p["estimate"], p["lower"], p["upper"])
            for p in sorted(s["points"], key=lambda p: p["n"])
        ]
        title = f"{s['gate']} · {s['slice']} ({fmt_num(s['confidence'])} confidence)"
        chart = svg.band_chart(points, title=title, threshold=s["threshold"], y_label=s["metric"])
        charts.append(
            f"<figure>{chart}"
            f"<figcaption>{_e(s['metric'])}: running estimate (line) inside its "
            f"confidence band; dashed red: decision threshold.</figcaption></figure>"
        )
    body = "".join(charts) or '<p class="none">no series</p>'
    return _section("metric", "Paired metric over time", f'<div class="charts">{body}</div>')


def _slices(doc: Mapping[str, Any]) -> str:
    t = doc["slice_table"]
    margin = t["margin"]
    rows = []
    intervals = []
    for r in t["rows"]:
        label = "all" if r["key"] == "all" else f"{r['key']}={r['value']}"
        rows.append(
            [
                _e(label),
                _e(fmt_num(r["n"])),
                _e(fmt_num(r["labels"])),
                _e(fmt_num(r["champion"])),
                _e(fmt_num(r["candidate"])),
                _e(fmt_num(r["difference"])),
                f"[{_e(fmt_num(r['lower']))}, {_e(fmt_num(r['upper']))}]",
                _status(r["status"]),
            ]
        )
        intervals.append(svg.Interval(label, r["difference"], r["lower"], r["upper"], r["status"]))
    metric = t["metric"]
    headers = [
        "slice",
        "pairs",
        "labels",
        f"champion {metric}",
        f"candidate {metric}",
        "difference",
        "confidence interval",
        "status",
    ]
    chart = svg.interval_chart(
        intervals,
        title=f"{metric}: candidate - champion per slice",
        threshold=None if margin is None else -margin,
        x_label=f"difference in {metric}",
    )
    note = (
        f"Non-inferiority margin {fmt_num(margin)}: a slice fails when its interval "
        f"lies below -margin."
        if margin is not None
        else ""
    )
    return _section(
        "slices",
        "Per-slice table",
        _table(headers, rows, "slices") + f"<figure>{chart}</figure>",
        _e(note),
    )


def _drift(doc: Mapping[str, Any]) -> str:
    rows = []
    bars = []
    for d in doc["drift"]:
        rows.append(
            [
                _e(d["feature"]),
                _e(d["kind"]),
                f'<span class="method">{_e(d["method"])}</span>',
                _e(fmt_num(d["statistic"])),
                _e(fmt_num(d["p_value"])),
                _e(fmt_num(d["e_value"])),
                _e(fmt_num(d["psi"])),
                _e(fmt_num(d["psi_threshold"])),
                f"{_e(fmt_num(d['n_reference']))} / {_e(fmt_num(d['n_current']))}",
                _status(d["status"]),
                _e(d.get("reason", "")),
            ]
        )
        bars.append(svg.Bar(d["feature"], d["psi"], d["status"]))
    thresholds = {d["psi_threshold"] for d in doc["drift"]}
    common = thresholds.pop() if len(thresholds) == 1 else None
    chart = (
        svg.bar_chart(
            bars, title="Population stability index per feature", threshold=common, x_label="PSI"
        )
        if bars
        else ""
    )
    headers = [
        "feature",
        "kind",
        "method",
        "statistic",
        "p-value",
        "e-value",
        "PSI",
        "PSI threshold",
        "n ref / cur",
        "status",
        "reason",
    ]
    note = (
        "Drift needs significance and an effect size (PSI) over its threshold. Input "
        "drift is a warning (both models see it); output divergence fails the candidate."
    )
    body = _table(headers, rows, "drift") + (f"<figure>{chart}</figure>" if chart else "")
    return _section("drift", "Drift per feature", body, _e(note))


def _latency(doc: Mapping[str, Any]) -> str:
    lat = doc["latency"]
    unit = lat["unit"]
    hists = [
        svg.Histogram(role, lat[role]["histogram"]["edges"], lat[role]["histogram"]["counts"])
        for role in ("champion", "candidate")
        if "histogram" in lat[role]
    ]
    chart = (
        svg.histogram_chart(hists, title="Latency distribution", x_label=f"latency ({unit})")
        if hists
        else ""
    )
    qs: dict[float, dict[str, float]] = {}
    for role in ("champion", "candidate"):
        for q in lat[role].get("quantiles", []):
            qs.setdefault(q["q"], {})[role] = q["value"]
    rows = []
    for q in sorted(qs):
        ch, ca = qs[q].get("champion"), qs[q].get("candidate")
        ratio = ca / ch if ch and ca is not None else None
        rows.append([_e(f"p{q * 100:g}"), _e(fmt_num(ch)), _e(fmt_num(ca)), _e(fmt_num(ratio, 3))])
    counts = (
        f"champion n={fmt_num(lat['champion']['n'])}, candidate n={fmt_num(lat['candidate']['n'])}"
    )
    table = _table(
        ["quantile", f"champion ({unit})", f"candidate ({unit})", "ratio"], rows, "latency"
    )
    body = (f"<figure>{chart}</figure>" if chart else "") + table
    return _section("latency", "Latency of both models", body, _e(counts))


def _pinned(doc: Mapping[str, Any]) -> str:
    p = doc["pinned"]
    gate = p["gate"]
    if gate is None:
        head = '<p class="none">No pinned set: the pinned gate did not run.</p>'
    else:
        head = (
            f'<p class="pinned-gate">Pinned gate {_status(gate["status"])} — '
            f"{_e(gate['reason'])} (statistic {_e(fmt_num(gate['statistic']))}, threshold "
            f"{_e(fmt_num(gate['threshold']))}, n={_e(fmt_num(gate['n']))}, "
            f'<span class="method">{_e(gate["method"])}</span>)</p>'
        )
    rows = [
        [
            f"<code>{_e(c['id'])}</code>",
            _e(fmt_ts(c["ts"])),
            _e(c["rule"]),
            f'<span class="state state-{_e(c["state"])}">{_e(c["state"])}</span>',
            _e(", ".join(f"{k}={v}" for k, v in sorted(c["slices"].items())) or "—"),
            _e(fmt_value(c["label"])),
            _e(fmt_value(c.get("champion_prediction"))),
            _e(fmt_value(c.get("candidate_prediction"))),
            f'<span class="wrong wrong-{_e(str(c.get("wrong", "unknown")).replace(" ", "-"))}">'
            f"{_e(c.get('wrong', 'unknown'))}</span>",
            _e(fmt_value(c["champion_output"])),
            _e(fmt_value(c["candidate_output"])),
            _e(fmt_num(c.get("recurrences", 1))),
        ]
        for c in p["harvested"]
    ]
    headers = [
        "case",
        "time",
        "rule",
        "state",
        "slices",
        "label",
        "champion predicted",
        "candidate predicted",
        "wrong",
        "champion output",
        "candidate output",
        "seen",
    ]
    note = (
        f"{fmt_num(p['harvested_total'])} cases harvested in this rollout "
        f"({len(p['harvested'])} listed); pinned set size {fmt_num(p['pinned_total'])}."
    )
    return _section("pinned", "Pinned failures", head + _table(headers, rows, "pinned"), _e(note))


def _timeline(doc: Mapping[str, Any]) -> str:
    rows = []
    for t in sorted(doc["timeline"], key=lambda t: t["ts"]):
        stage = (
            f"{t['stage_from'] or '—'} → {t['stage_to'] or '—'}"
            if t["stage_from"] or t["stage_to"]
            else ""
        )
        event = t["event"] + (f": {t['action']}" if t.get("action") else "")
        rows.append(
            [
                _e(fmt_ts(t["ts"])),
                f'<span class="event event-{_e(t["event"])}">{_e(event)}</span>',
                _e(t["who"]),
                _e(stage),
                _e(t["verdict"] or ""),
                _e(t["reason"]),
            ]
        )
    table = _table(["time", "event", "who", "stage", "verdict", "reason"], rows, "timeline")
    return _section(
        "timeline",
        "Decision timeline",
        table,
        "Engine decisions and operator actions, oldest first.",
    )


def _repro(doc: Mapping[str, Any], digest: str) -> str:
    rows = []
    for role in ("champion", "candidate"):
        m = doc["models"][role]
        extra = ", ".join(f"{k}={v}" for k, v in sorted((m.get("extra") or {}).items()))
        rows.append(
            [
                _e(role),
                _e(m["name"]),
                _e(m["kind"]),
                f"<code>{_e(m['digest'])}</code>",
                _e(m["device"]),
                _e(extra) or "—",
            ]
        )
    models = _table(["role", "name", "kind", "digest", "device", "extra"], rows, "models")
    versions = _table(
        ["library", "version"],
        [[_e(k), _e(v if v is not None else "absent")] for k, v in sorted(doc["versions"].items())],
        "versions",
    )
    cfg = doc["config"]
    meta = (
        f"<p>Config digest <code>{_e(cfg['digest'])}</code>"
        f"{' from ' + _e(cfg['source']) if cfg.get('source') else ''}. "
        f"Report schema version {_e(doc['schema_version'])}; report digest "
        f"<code>{_e(digest)}</code>.</p>"
    )
    return _section("reproduce", "Reproducibility", models + meta + versions)


CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans",
  sans-serif; color: #24292f; background: #f6f8fa; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
header h1 { font-size: 22px; margin: 0 0 4px; }
header p { margin: 0; color: #57606a; }
nav { margin: 12px 0 18px; display: flex; flex-wrap: wrap; gap: 6px 14px; font-size: 13px; }
nav a { color: #0969da; text-decoration: none; }
h2 { font-size: 17px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #d0d7de; }
.verdict { display: flex; gap: 20px; align-items: center; padding: 16px 20px; border-radius: 8px;
  color: #fff; }
.verdict-abort { background: #b42318; }
.verdict-promote { background: #1a7f37; }
.verdict-continue { background: #9a6700; }
.verdict-word { font-size: 30px; font-weight: 800; letter-spacing: 0.04em; }
.verdict .reason { font-size: 16px; font-weight: 600; margin: 0 0 4px; }
.verdict .when { margin: 0; opacity: 0.9; }
.summary { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr));
  gap: 6px 18px; margin-top: 16px; }
.kv { display: flex; flex-direction: column; padding: 6px 0; border-bottom: 1px solid #eaeef2; }
.kv .k { font-size: 11px; text-transform: uppercase; color: #57606a; letter-spacing: 0.05em; }
.kv .v { font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; font-size: 13px; margin: 6px 0 10px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #eaeef2;
  vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; white-space: nowrap; }
td { font-variant-numeric: tabular-nums; overflow-wrap: break-word; }
table.versions, table.models, table.latency { width: auto; min-width: 420px; }
td.none, p.none { color: #57606a; font-style: italic; }
.status { display: inline-block; white-space: nowrap; padding: 1px 7px; border-radius: 10px;
  font-size: 11px; font-weight: 700; color: #fff; }
.status-pass { background: #1a7f37; }
.status-inconclusive { background: #9a6700; }
.status-fail { background: #cf222e; }
.method { color: #57606a; font-size: 12px; }
.muted { color: #57606a; }
.tag { font-size: 11px; color: #57606a; border: 1px solid #d0d7de; border-radius: 4px;
  padding: 0 4px; }
.note { color: #57606a; margin: 0 0 8px; }
.match { color: #1a7f37; font-weight: 600; }
.mismatch { color: #cf222e; font-weight: 700; }
.decision-approve { color: #1a7f37; font-weight: 600; }
.decision-reject { color: #cf222e; font-weight: 600; }
.state-pinned { font-weight: 600; }
.glance { margin: 6px 0 0; font-weight: 600; }
.advisory-fails { margin: 4px 0 0; }
details.gate-family { margin: 6px 0; border: 1px solid #eaeef2; border-radius: 6px;
  padding: 4px 8px; }
details.gate-family summary { cursor: pointer; padding: 2px 0; }
.family { font-weight: 700; margin-right: 4px; }
.wrong-candidate, .wrong-both { color: #cf222e; font-weight: 700; }
.wrong-champion { color: #1a7f37; font-weight: 600; }
.state-dismissed { color: #57606a; text-decoration: line-through; }
code { font: 12px ui-monospace, "DejaVu Sans Mono", monospace; overflow-wrap: anywhere; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px; }
figure { margin: 8px 0; }
figure svg { max-width: 100%; height: auto; border: 1px solid #eaeef2; border-radius: 6px; }
figcaption { font-size: 12px; color: #57606a; }
footer { margin-top: 32px; font-size: 12px; color: #57606a; }
"""

SECTIONS = [
    ("signoffs", "Sign-offs"),
    ("gates", "Gates"),
    ("metric", "Metric over time"),
    ("slices", "Slices"),
    ("drift", "Drift"),
    ("latency", "Latency"),
    ("pinned", "Pinned failures"),
    ("timeline", "Timeline"),
    ("reproduce", "Reproducibility"),
]


def render_html(doc: Mapping[str, Any], *, validate: bool = True) -> str:
    """The validation report as one self-contained HTML page."""
    if validate:
        validate_document(doc)
    digest = report_digest(doc)
    rid = doc["rollout"]["id"]
    m = doc["models"]
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in SECTIONS)
    body = "".join(
        [
            _verdict(doc),
            _summary(doc, digest),
            _signoffs(doc, digest),
            _gates(doc),
            _series(doc),
            _slices(doc),
            _drift(doc),
            _latency(doc),
            _pinned(doc),
            _timeline(doc),
            _repro(doc, digest),
        ]
    )
    title = f"mirrorgate validation report — rollout {rid}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="mirrorgate-report-digest" content="{_e(digest)}">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
        f"<header><h1>{_e(title)}</h1><p>{_e(m['champion']['name'])} (champion) vs "
        f"{_e(m['candidate']['name'])} (candidate) · evidence as of "
        f"{_e(fmt_ts(doc['rollout']['as_of']))}</p></header>"
        f"<nav>{nav}</nav>{body}"
        "<footer>Generated by mirrorgate from report.json (the signed document); this page "
        "is a rendering of it and needs no network.</footer>"
        "</main></body></html>\n"
    )


@dataclass(frozen=True, slots=True)
class Pack:
    json_path: Path
    html_path: Path
    digest: str


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())  # mkstemp's 0600 -> what the umask allows
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_pack(doc: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> Pack:
    """Validate, then write ``report.json`` (canonical) and ``report.html`` into ``out_dir``.

    Nothing is written when the document is invalid; each file is replaced atomically.
    """
    validate_document(doc)
    data = canonical_json(doc)
    page = render_html(doc, validate=False).encode("utf-8")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        json_path, html_path = out / JSON_NAME, out / HTML_NAME
        _write_atomic(json_path, data)
        _write_atomic(html_path, page)
    except OSError as exc:
        raise BadRequest(f"cannot write the pack to {out}: {exc.strerror or exc}") from exc
    return Pack(json_path=json_path, html_path=html_path, digest=report_digest(doc))
