"""The demo's traffic as paired records, without the proxy: for replay, tests and the docs.

Runs the champion and a candidate in-process (onnxruntime, one thread) on every request of
a :class:`~proxy.demo.traffic.Traffic`, in order, timing each call, and produces one
:class:`gates.records.PairRecord` per row — the records the proxy would have written
for the same traffic. :func:`write_pairs_jsonl` writes them in DESIGN.md's paired-record
JSON Lines format, labels inline or in their own file with their arrival time, so that
``mirrorgate replay --pairs FILE [--labels FILE]`` can be demonstrated and tested on it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from gates.records import ModelResult, PairRecord
from proxy.demo.capture import FEATURE_NAMES
from proxy.demo.offline import OfflineModel
from proxy.demo.traffic import DemoLabel, Traffic

# 2025-11-25T06:13:20Z: a fixed epoch so that files written from the same traffic agree.
DEFAULT_START_TS = 1_764_051_200.0


def iter_pair_records(
    traffic: Traffic,
    champion: OfflineModel,
    candidate: OfflineModel,
    *,
    start_ts: float = DEFAULT_START_TS,
    include_features: bool = True,
) -> Iterator[PairRecord]:
    """One unlabelled PairRecord per row of every request, in request order.

    ``latency_ms`` is each model's measured in-process time for the whole request (what
    a proxy records for every row of a batched request); the only non-deterministic field.
    """
    for req in traffic.requests():
        t0 = time.perf_counter()
        champ_out = champion.predict_proba(req.features)
        t1 = time.perf_counter()
        cand_out = candidate.predict_proba(req.features)
        t2 = time.perf_counter()
        champ_ms, cand_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        for k, rid in enumerate(req.record_ids):
            features: dict[str, float | str] = {}
            if include_features:
                features = {
                    name: float(v) for name, v in zip(FEATURE_NAMES, req.features[k], strict=True)
                }
            yield PairRecord(
                id=rid,
                ts=start_ts + req.t,
                champion=ModelResult(output=champ_out[k], latency_ms=champ_ms),
                candidate=ModelResult(output=cand_out[k], latency_ms=cand_ms),
                slices=req.slices,
                features=features,
            )


@dataclass(frozen=True, slots=True)
class PairsFile:
    """What :func:`write_pairs_jsonl` wrote."""

    pairs_path: Path
    labels_path: Path | None
    pairs: int
    labels: int


def _label_line(label: DemoLabel, start_ts: float) -> dict[str, object]:
    return {"id": label.id, "label": label.label, "ts": start_ts + label.t}


def _atomic_writer(path: Path) -> tuple[IO[str], Path]:
    """A temporary file beside ``path`` (same file system, so the rename is atomic)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    return tmp.open("x", encoding="utf-8"), tmp


def write_pairs_jsonl(
    pairs_path: str | os.PathLike[str],
    traffic: Traffic,
    champion: str | os.PathLike[str] | OfflineModel,
    candidate: str | os.PathLike[str] | OfflineModel,
    *,
    labels_path: str | os.PathLike[str] | None = None,
    start_ts: float = DEFAULT_START_TS,
    include_features: bool = True,
) -> PairsFile:
    """Write the traffic's paired records (and labels) as JSON Lines.

    Without ``labels_path`` each record carries its label inline (``null`` for rows never
    labelled); with it, records have no label and the labels file holds
    ``{"id", "label", "ts"}`` lines in arrival order, ``ts`` the label's arrival time.
    Files appear complete or not at all (written to a temporary file, then renamed).
    """
    champ = champion if isinstance(champion, OfflineModel) else OfflineModel(champion)
    cand = candidate if isinstance(candidate, OfflineModel) else OfflineModel(candidate)
    out = Path(pairs_path)
    labels_out = Path(labels_path) if labels_path is not None else None
    labels = traffic.labels()
    inline = {lab.id: lab.label for lab in labels} if labels_out is None else {}
    written: list[Path] = []
    try:
        fh, tmp = _atomic_writer(out)
        written.append(tmp)
        n_pairs = 0
        with fh:
            for record in iter_pair_records(
                traffic, champ, cand, start_ts=start_ts, include_features=include_features
            ):
                record.label = inline.get(record.id)
                fh.write(json.dumps(record.to_dict(), separators=(",", ":")) + "\n")
                n_pairs += 1
        tmp_labels = None
        if labels_out is not None:
            lfh, tmp_labels = _atomic_writer(labels_out)
            written.append(tmp_labels)
            with lfh:
                for lab in labels:
                    lfh.write(json.dumps(_label_line(lab, start_ts), separators=(",", ":")) + "\n")
        os.replace(tmp, out)
        if labels_out is not None and tmp_labels is not None:
            os.replace(tmp_labels, labels_out)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return PairsFile(out, labels_out, n_pairs, len(labels))


def paired_correctness(
    records: list[PairRecord], labels: dict[str, int]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(champion correct, candidate correct, slice) for the labelled records: a check of
    what a file says, used by the tests and the docs' numbers."""
    champ, cand, slices = [], [], []
    for rec in records:
        label = labels.get(rec.id)
        if label is None or rec.champion.output is None or rec.candidate.output is None:
            continue
        champ.append(int(np.argmax(rec.champion.output)) == label)
        cand.append(int(np.argmax(rec.candidate.output)) == label)
        slices.append(rec.slices.get("platform", ""))
    return np.array(champ, dtype=bool), np.array(cand, dtype=bool), slices
