"""Helpers for whoever assembles a report document from live evidence (storage + gates).

Small, pure pieces whose shape is easy to get wrong: library versions, model identities
and the two latency distributions on shared bins.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import numpy as np

from proxy import __version__
from proxy.protocol.base import ModelIdentity

VERSIONED = ("numpy", "scipy", "onnxruntime", "torch", "sqlalchemy", "aiohttp")
QUANTILES = (0.5, 0.9, 0.95, 0.99, 1.0)


def collect_versions() -> dict[str, str | None]:
    """The ``versions`` member: python, mirrorgate and each library (None when absent)."""
    out: dict[str, str | None] = {"python": platform.python_version(), "mirrorgate": __version__}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def identity_dict(identity: ModelIdentity) -> dict[str, Any]:
    """A ``models.champion``/``models.candidate`` member from a backend's identity."""
    out: dict[str, Any] = {
        "name": identity.name,
        "kind": identity.kind,
        "digest": identity.digest,
        "device": identity.device,
    }
    if identity.extra:
        out["extra"] = {str(k): str(v) for k, v in identity.extra.items()}
    return out


def _distribution(values: np.ndarray, edges: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {"n": int(values.size)}
    if values.size == 0:
        out["quantiles"] = []
        return out
    qs = np.quantile(values, QUANTILES)
    out["quantiles"] = [
        {"q": q, "value": round(float(v), 4)} for q, v in zip(QUANTILES, qs, strict=True)
    ]
    # Values past the last edge land in the last bin so the counts add up to n.
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    out["histogram"] = {
        "edges": [round(float(e), 4) for e in edges],
        "counts": [int(c) for c in counts],
    }
    return out


def latency_section(
    champion_ms: Sequence[float] | np.ndarray,
    candidate_ms: Sequence[float] | np.ndarray,
    *,
    bins: int = 40,
    clip_quantile: float = 0.995,
) -> dict[str, Any]:
    """The ``latency`` member: quantiles and histograms of both models on the same bins.

    Bins span 0 to the ``clip_quantile`` of both samples together (a few outliers would
    otherwise squeeze every bar into one); values beyond go to the last bin, and the
    quantiles (p100 included) are of the raw values.
    """
    ch = np.asarray(champion_ms, dtype=np.float64)
    ca = np.asarray(candidate_ms, dtype=np.float64)
    ch, ca = ch[np.isfinite(ch)], ca[np.isfinite(ca)]
    both = np.concatenate([ch, ca])
    top = float(np.quantile(both, clip_quantile)) if both.size else 1.0
    edges = np.linspace(0.0, top if top > 0 else 1.0, bins + 1)
    return {
        "unit": "ms",
        "champion": _distribution(ch, edges),
        "candidate": _distribution(ca, edges),
    }
