"""The never-regress suite: pinned cases exported as files, and run against any model.

A suite is a folder::

    manifest.json          format, version, created_at, task, model identities, cases
    cases/case-<id>.npz    the case's input tensors (one row, without the batch axis)
    results.jsonl          (written by ``suite run``) one line per run, for curation

``created_at`` is the latest triage time of the exported cases, not the wall clock, and
the ``.npz`` files are written with fixed zip timestamps, so exporting an unchanged
pinned set twice gives identical bytes. A case passes when :func:`gates.harvest.
case_outcome` says the model's output meets its expectation.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from gates.harvest import CaseOutcome, case_outcome
from gates.records import Label
from proxy.core.config import BackendSettings, load_config
from proxy.core.errors import BadRequest
from proxy.protocol.base import Backend, ModelMetadata
from storage.entities import PinnedCase
from storage.store import Store

FORMAT = "mirrorgate-pinned-suite"
VERSION = 1
MANIFEST = "manifest.json"
CASES_DIR = "cases"
RESULTS = "results.jsonl"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


# ------------------------------------------------------------------------- inputs


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """An ``.npz`` (readable by ``np.load``) with fixed timestamps: same arrays, same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            arr = np.asarray(arrays[name])
            if arr.dtype == object:
                # BYTES tensors: fixed-width bytes, never pickled.
                arr = arr.astype(np.bytes_)
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    path.write_bytes(buf.getvalue())


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        out = {}
        for name in data.files:
            arr = np.asarray(data[name])
            if arr.dtype.kind == "S":
                arr = np.array([bytes(x) for x in arr.reshape(-1)], dtype=object).reshape(arr.shape)
            out[name] = arr
        return out


def model_inputs(
    metadata: ModelMetadata, inputs: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], bool]:
    """The tensors to send: a batch axis is added when the model declares one more
    dimension than the case's row has (cases hold one row without its batch axis)."""
    specs = {s.name: s for s in metadata.inputs}
    batched = bool(specs) and all(
        name in specs and len(specs[name].shape) == np.ndim(arr) + 1 for name, arr in inputs.items()
    )
    if batched:
        return {k: np.asarray(v)[None, ...] for k, v in inputs.items()}, True
    return {k: np.asarray(v) for k, v in inputs.items()}, False


def gated_output(
    metadata: ModelMetadata, outputs: Mapping[str, np.ndarray], name: str | None
) -> Any:
    if name is None and metadata.outputs:
        name = metadata.outputs[0].name
    if name is not None and name in outputs:
        return outputs[name]
    return next(iter(outputs.values()), None)


async def judge(
    backend: Backend,
    inputs: Mapping[str, np.ndarray],
    expected: Label,
    score_tolerance: float | None,
    *,
    output_name: str | None = None,
) -> CaseOutcome:
    """Run one case on a model and judge its output (a failing call is a failed case)."""
    batch, batched = model_inputs(backend.metadata, inputs)
    try:
        out = await backend.infer(batch)
    except Exception as exc:  # the model failing on a pinned case is a regression
        return case_outcome(None, expected, score_tolerance, error=f"{type(exc).__name__}: {exc}")
    arr = gated_output(backend.metadata, out, output_name)
    if arr is None:
        return case_outcome(None, expected, score_tolerance, error="no output")
    value = np.asarray(arr)
    if batched and value.ndim >= 1 and value.shape[0] == 1:
        value = value[0]
    try:
        number = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return case_outcome(None, expected, score_tolerance, error="non-numeric output")
    return case_outcome(number, expected, score_tolerance)


# ------------------------------------------------------------------------- export


def case_name(case_id: int) -> str:
    return f"case-{case_id}"


def _jsonable(value: Any) -> Any:
    if value is None:
        return None
    arr = np.asarray(value)
    return arr.item() if arr.ndim == 0 else arr.tolist()


def manifest_for(cases: Sequence[PinnedCase], task: str | None) -> dict[str, Any]:
    created = max((c.updated_at for c in cases), default=0.0)
    models: dict[str, dict[str, Any]] = {}
    entries = []
    for c in cases:
        for m in (c.champion, c.candidate):
            if m is not None:
                models.setdefault(f"{m.name}@{m.digest[:12]}", m.to_dict())
        ev = c.evidence
        entries.append(
            {
                "id": case_name(c.id),
                "case_id": c.id,
                "task": c.task,
                "inputs": f"{CASES_DIR}/{case_name(c.id)}.npz",
                "inputs_digest": c.inputs_digest,
                "expect": {"label": c.expected_label, "score_tolerance": c.score_tolerance},
                "rule": c.rule,
                "recurrence_count": c.recurrence_count,
                "first_seen": c.first_seen,
                "last_seen": c.last_seen,
                "pinned_at": c.updated_at,
                "rollout_id": c.rollout_id,
                "champion": c.champion.to_dict() if c.champion else None,
                "candidate": c.candidate.to_dict() if c.candidate else None,
                "evidence": {
                    "request_id": ev.id,
                    "ts": ev.ts,
                    "label": ev.label,
                    "slices": dict(sorted(ev.slices.items())),
                    "champion": {
                        "output": _jsonable(ev.champion.output),
                        "error": ev.champion.error,
                    },
                    "candidate": {
                        "output": _jsonable(ev.candidate.output),
                        "error": ev.candidate.error,
                    },
                },
            }
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        "created_at": created,
        "task": task,
        "models": dict(sorted(models.items())),
        "cases": entries,
    }


@dataclass(frozen=True, slots=True)
class ExportResult:
    cases: int
    skipped: list[int]  # pinned cases without stored inputs (cannot be replayed)


def export_suite(
    store: Store, out: str | os.PathLike[str], *, task: str | None = None
) -> ExportResult:
    """Write the pinned cases (of ``task``, or all) as a suite into ``out``.

    The manifest and case files are written to a temporary folder and moved into place,
    so a failed export leaves the previous suite intact; ``results.jsonl`` is kept.
    """
    cases = store.list_pinned(status="pinned", task=task, with_inputs=True)
    usable = [c for c in cases if c.inputs]
    skipped = [c.id for c in cases if not c.inputs]
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=dest))
    try:
        (tmp / CASES_DIR).mkdir()
        for c in usable:
            assert c.inputs is not None
            write_npz(tmp / CASES_DIR / f"{case_name(c.id)}.npz", c.inputs)
        manifest = manifest_for(usable, task)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        old = dest / CASES_DIR
        if old.exists():
            shutil.rmtree(old)
        os.replace(tmp / CASES_DIR, old)
        os.replace(tmp / MANIFEST, dest / MANIFEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(len(usable), skipped)


# ------------------------------------------------------------------------- load / run


@dataclass(frozen=True, slots=True)
class SuiteCase:
    id: str
    inputs_path: Path
    expected: Label
    score_tolerance: float | None
    entry: dict[str, Any]

    def inputs(self) -> dict[str, np.ndarray]:
        return read_npz(self.inputs_path)


@dataclass(frozen=True, slots=True)
class Suite:
    path: Path
    manifest: dict[str, Any]
    cases: list[SuiteCase]


def load_suite(path: str | os.PathLike[str]) -> Suite:
    """Read and check a suite folder; BadRequest (exit 2 / 400) naming what is wrong."""
    root = Path(path)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except OSError as exc:
        raise BadRequest(f"{root}: no readable {MANIFEST}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise BadRequest(f"{root / MANIFEST}: not JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadRequest(f"{root / MANIFEST}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise BadRequest(
            f"{root / MANIFEST}: suite version {manifest.get('version')!r}, "
            f"this mirrorgate reads version {VERSION}"
        )
    cases = []
    for i, entry in enumerate(manifest.get("cases") or []):
        try:
            cid = str(entry["id"])
            rel = str(entry["inputs"])
            expect = entry["expect"]
            label = expect["label"]
            tol = expect.get("score_tolerance")
        except (KeyError, TypeError) as exc:
            raise BadRequest(f"{root / MANIFEST}: cases[{i}]: missing {exc}") from exc
        file = (root / rel).resolve()
        if root.resolve() not in file.parents or not file.is_file():
            raise BadRequest(f"{root / MANIFEST}: cases[{i}]: inputs file {rel!r} is missing")
        cases.append(SuiteCase(cid, file, label, None if tol is None else float(tol), entry))
    return Suite(root, manifest, cases)


@dataclass(slots=True)
class CaseResult:
    id: str
    passed: bool
    margin: float
    predicted: Any
    expected: Label
    detail: str

    def to_dict(self) -> dict[str, Any]:
        margin = self.margin if np.isfinite(self.margin) else None
        return {
            "id": self.id,
            "passed": self.passed,
            "margin": margin,
            "predicted": self.predicted,
            "expected": self.expected,
            "detail": self.detail,
        }


@dataclass(slots=True)
class SuiteResult:
    model: dict[str, str]
    suite: str
    ts: float
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def failed(self) -> list[CaseResult]:
        return [c for c in self.cases if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "suite": self.suite,
            "ts": self.ts,
            "total": len(self.cases),
            "passed": len(self.cases) - len(self.failed),
            "failed": len(self.failed),
            "result": "fail" if self.failed else "pass",
            "cases": [c.to_dict() for c in self.cases],
        }


def identity_dict(backend: Backend) -> dict[str, str]:
    i = backend.identity
    return {"name": i.name, "kind": i.kind, "digest": i.digest, "device": i.device}


async def run_suite(
    backend: Backend,
    suite: Suite,
    *,
    output_name: str | None = None,
    now: float | None = None,
    wrap: Callable[[list[SuiteCase]], Iterable[SuiteCase]] | None = None,
) -> SuiteResult:
    """Judge every case; ``wrap`` may wrap the case list (a progress bar)."""
    result = SuiteResult(
        identity_dict(backend), str(suite.path), time.time() if now is None else now
    )
    for case in wrap(list(suite.cases)) if wrap else suite.cases:
        outcome = await judge(
            backend, case.inputs(), case.expected, case.score_tolerance, output_name=output_name
        )
        result.cases.append(
            CaseResult(
                case.id,
                outcome.passed,
                outcome.margin,
                outcome.predicted,
                case.expected,
                outcome.detail,
            )
        )
    return result


def record_result(suite: Suite, result: SuiteResult, path: Path | None = None) -> Path:
    """Append one run to the suite's results file (what curation reads)."""
    target = path or suite.path / RESULTS
    line = json.dumps(
        {
            "ts": result.ts,
            "model": result.model,
            "cases": {
                c.id: {"passed": c.passed, "margin": c.to_dict()["margin"]} for c in result.cases
            },
        },
        sort_keys=True,
    )
    with target.open("a") as fh:
        fh.write(line + "\n")
    return target


# ------------------------------------------------------------------------- curation


@dataclass(slots=True)
class Curation:
    runs: int
    models: list[str]
    retire: list[dict[str, Any]]  # every recent model passed with a wide margin
    blockers: list[dict[str, Any]]  # failed in at least `min_failures` recent runs

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "models": self.models,
            "retire": self.retire,
            "blockers": self.blockers,
        }


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    runs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise BadRequest(f"{path}:{n}: not JSON: {exc}") from exc
    return runs


def curate(
    suite: Suite,
    runs: Sequence[dict[str, Any]],
    *,
    recent_models: int = 5,
    wide_margin: float = 0.5,
    min_failures: int = 2,
) -> Curation:
    """Over the latest run of each of the last ``recent_models`` distinct models: cases
    all of them passed with margin >= ``wide_margin`` (no longer discriminating:
    candidates to retire, deliberately) and cases that failed in >= ``min_failures``
    of all recorded runs (repeat blockers: worth a look — a wrong expectation, or a
    real weakness)."""
    latest: dict[str, dict[str, Any]] = {}
    for run in sorted(runs, key=lambda r: float(r.get("ts", 0))):
        model = run.get("model") or {}
        latest.pop(f"{model.get('name')}@{model.get('digest')}", None)
        latest[f"{model.get('name')}@{model.get('digest')}"] = run
    recent = list(latest.items())[-recent_models:]
    retire, blockers = [], []
    for case in suite.cases:
        margins = [r["cases"][case.id] for _, r in recent if case.id in r.get("cases", {})]
        if (
            recent
            and len(margins) == len(recent)
            and all(
                m["passed"] and m["margin"] is not None and m["margin"] >= wide_margin
                for m in margins
            )
        ):
            retire.append(
                {
                    "id": case.id,
                    "runs": len(margins),
                    "min_margin": min(m["margin"] for m in margins),
                }
            )
        failures = [
            (r.get("model") or {}).get("name")
            for r in runs
            if case.id in r.get("cases", {}) and not r["cases"][case.id]["passed"]
        ]
        if len(failures) >= min_failures:
            blockers.append(
                {
                    "id": case.id,
                    "failures": len(failures),
                    "models": sorted(set(map(str, failures))),
                }
            )
    return Curation(len(runs), [k for k, _ in recent], retire, blockers)


def format_table(result: SuiteResult) -> str:
    rows = [("case", "result", "expected", "predicted", "margin")]
    for c in result.cases:
        margin = "" if not np.isfinite(c.margin) else f"{c.margin:.4f}"
        rows.append(
            (c.id, "pass" if c.passed else "FAIL", str(c.expected), str(c.predicted), margin)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    failed = len(result.failed)
    lines.append(
        f"{len(result.cases) - failed} passed, {failed} failed of {len(result.cases)} "
        f"pinned cases on {result.model['name']} ({result.model['digest'][:12]})"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------- the model


def model_settings(spec: str, *, role: str = "candidate") -> tuple[BackendSettings, str | None]:
    """What ``--model`` names: an ``.onnx`` file, a backend settings YAML (``kind:``...),
    or a mirrorgate config (its candidate, or ``role``). Returns the settings and the
    gated output name (the config's ``output.output``, if any)."""
    path = Path(spec)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise BadRequest(f"--model {spec}: no such file")
        return BackendSettings(name=path.stem, kind="onnx", path=str(path.resolve())), None
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise BadRequest(f"--model {spec}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise BadRequest(f"--model {spec}: not YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest(f"--model {spec}: expected a mapping")
    if "models" in data:
        config = load_config(path)
        chosen = config.models.candidate if role == "candidate" else config.models.champion
        if chosen is None:
            raise BadRequest(f"--model {spec}: the config has no {role}")
        return chosen, config.output.output
    if isinstance(data.get("path"), str) and not Path(data["path"]).is_absolute():
        data["path"] = str((path.parent / data["path"]).resolve())
    try:
        return BackendSettings.model_validate(data), None
    except ValidationError as exc:
        raise BadRequest(f"--model {spec}: invalid backend settings: {exc}") from exc


async def run_suite_on(
    suite: Suite,
    spec: str,
    *,
    role: str = "candidate",
    wrap: Callable[[list[SuiteCase]], Iterable[SuiteCase]] | None = None,
) -> SuiteResult:
    """Build the model ``spec`` names, run the suite on it, close it."""
    from proxy.backends.factory import create_backend

    settings, output_name = model_settings(spec, role=role)
    backend = await create_backend(settings)
    try:
        return await run_suite(backend, suite, output_name=output_name, wrap=wrap)
    finally:
        await backend.aclose()
