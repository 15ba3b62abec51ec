"""Fixtures of the gates tests: record builders and settings with only some gates on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from gates.records import ModelResult, PairRecord
from gates.settings import GatesSettings, RolloutSettings, StageSettings

ALL_FAMILIES = ("contract", "tolerance", "metric", "latency", "errors")


def only(*families: str, **overrides: Any) -> GatesSettings:
    """Default gates with every family not named switched off (drift: 'drift.output',
    'drift.input'; pinned: 'pinned'). The ``equivalence`` preset: a family named here is
    tested as it blocks (override with ``preset="retrained"``)."""
    data: dict[str, Any] = {"preset": "equivalence"}
    for fam in ALL_FAMILIES:
        data[fam] = {"enabled": fam in families}
    data["drift"] = {
        "output": {"enabled": "drift.output" in families},
        "input": {"enabled": "drift.input" in families},
    }
    data["pinned"] = {"enabled": "pinned" in families}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return GatesSettings.model_validate(data)


def plan(*stages: dict[str, Any], every: int = 100, every_s: float = 1e9) -> RolloutSettings:
    return RolloutSettings(
        stages=[StageSettings(**s) for s in stages],
        evaluate_every_pairs=every,
        evaluate_every_s=every_s,
    )


def record(
    i: int,
    champ: Any,
    cand: Any,
    *,
    ts: float | None = None,
    label: Any = None,
    slices: dict[str, str] | None = None,
    features: dict[str, float | str] | None = None,
    lat: tuple[float, float] = (5.0, 5.0),
    err: tuple[str | None, str | None] = (None, None),
) -> PairRecord:
    return PairRecord(
        id=f"r{i}",
        ts=float(i if ts is None else ts),
        champion=ModelResult(None if err[0] else np.asarray(champ, dtype=float), lat[0], err[0]),
        candidate=ModelResult(None if err[1] else np.asarray(cand, dtype=float), lat[1], err[1]),
        slices=slices or {},
        features=features or {},
        label=label,
    )


@pytest.fixture
def make_record() -> Callable[..., PairRecord]:
    return record


def classification_records(n: int, seed: int, **scenario: Any) -> list[PairRecord]:
    """Labelled classification pairs with slices, features, latencies and some errors."""
    from gates.simulate import Scenario, records

    sc = Scenario(champion_error_rate=0.01, candidate_error_rate=0.03, **scenario)
    return records(sc, n, seed)


def regression_records(n: int, seed: int) -> list[PairRecord]:
    rng = np.random.default_rng(seed)
    y = rng.normal(10, 3, n)
    out = []
    for i in range(n):
        out.append(
            record(
                i,
                y[i] + rng.normal(0, 1.0),
                y[i] + rng.normal(0, 1.1),
                ts=1000.0 + i,
                label=float(y[i]),
                slices={"region": ["eu", "us"][i % 2]},
                features={"x": float(rng.normal())},
                lat=(float(rng.lognormal(1, 0.3)), float(rng.lognormal(1.1, 0.3))),
            )
        )
    return out


def assert_state_close(a: Any, b: Any, path: str = "state") -> None:
    """Structural equality of two state dicts, floats within rounding, cell tables by name."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) == {"names", "data"} or set(a) == {"names", "data", "width"}:
            ra = dict(zip(a["names"], a["data"], strict=True))
            rb = dict(zip(b["names"], b["data"], strict=True))
            assert set(ra) == set(rb), f"{path}: cells {sorted(ra)} != {sorted(rb)}"
            for k in ra:
                np.testing.assert_allclose(ra[k], rb[k], rtol=1e-9, atol=1e-9, err_msg=path)
            return
        assert set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_state_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_state_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-9), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
