"""Slice keys from headers/parameters, feature columns, and rules parsed without eval."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from multidict import CIMultiDict

from proxy.core.config import FeaturesSettings, SlicesSettings
from proxy.core.errors import ConfigError
from proxy.dataplane.slicing import MAX_VALUE_LEN, Slicer, parse_rule


def _slicer(**slices: object) -> Slicer:
    return Slicer(
        SlicesSettings(**slices),  # type: ignore[arg-type]
        FeaturesSettings(input="x", names=["age", "income", "platform"]),
    )


def test_header_and_parameter_slices_only_configured_keys() -> None:
    slicer = _slicer(headers=["platform", "region"], parameters=["tenant", "beta"])
    headers = CIMultiDict(
        {
            "x-mirrorgate-slice-platform": " mobile ",
            "X-Mirrorgate-Slice-unlisted": "x",
            "X-Mirrorgate-Slice-region": "r" * 500,
        }
    )
    params = {"tenant": "acme", "beta": True, "other": "ignored"}
    slices = slicer.request_slices(headers, params)
    assert slices == {
        "platform": "mobile",
        "region": "r" * MAX_VALUE_LEN,
        "tenant": "acme",
        "beta": "true",
    }


def test_parameter_slices_travel_small_and_agree_with_the_slicer() -> None:
    # what a pass-through pair carries to the shadow worker (pickled per request)
    slicer = _slicer(rules={"big": "age > 50"}, parameters=["tenant", "beta"])
    params = {"tenant": "t" * 500, "beta": False, "other": "ignored"}
    carried = pickle.loads(pickle.dumps(slicer.parameter_slices))
    assert carried(params) == slicer.request_slices({}, params)
    assert carried(params) == {"tenant": "t" * MAX_VALUE_LEN, "beta": "false"}
    assert len(pickle.dumps(slicer.parameter_slices)) < len(pickle.dumps(slicer))


def test_parameter_wins_over_header_for_the_same_key() -> None:
    slicer = _slicer(headers=["platform"], parameters=["platform"])
    slices = slicer.request_slices(
        CIMultiDict({"X-Mirrorgate-Slice-platform": "web"}), {"platform": "ios"}
    )
    assert slices == {"platform": "ios"}


@pytest.mark.parametrize(
    ("text", "values", "expected"),
    [
        ("age < 25", {"age": 24}, True),
        ("age < 25", {"age": 25}, False),
        ("income >= 50000", {"income": 50000.0}, True),
        ("income >= 5e4", {"income": 49999.5}, False),
        ("platform == mobile", {"platform": "mobile"}, True),
        ("platform != 'mobile'", {"platform": "web"}, True),
        ('platform == "smart tv"', {"platform": "smart tv"}, True),
        ("age > -1.5", {"age": "3"}, True),  # numeric text compares as a number
        ("age < 25", {"age": "unknown"}, None),  # not a number: no slice, not a wrong one
        ("age < 25", {}, None),
        ("age < 25", {"age": float("nan")}, None),
    ],
)
def test_rules(text: str, values: dict[str, object], expected: bool | None) -> None:
    assert parse_rule("r", text)(values) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("__import__('os').system('x')", "cannot parse"),
        ("age <", "cannot parse"),
        ("age < 25 and income > 3", "cannot parse"),
        ("platform < mobile", "< needs a number"),
        ("age ~ 3", "cannot parse"),
    ],
)
def test_bad_rules_are_config_errors_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_rule("young", text)
    assert err.value.message.startswith("slices.rules.young:")
    assert message in err.value.message


def test_rule_on_unknown_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"slices.rules.r: 'height' is not a feature"):
        _slicer(rules={"r": "height > 2"})


def test_row_features_and_rule_slices_per_row() -> None:
    slicer = _slicer(headers=["platform"], rules={"young": "age < 25", "ios": "platform == ios"})
    x = np.array([[20, 1000.5, 7], [40, 2.0, 7]], dtype=np.float32)
    rows = [slicer.row_features({"x": x}, i) for i in range(2)]
    assert rows[0] == {"age": 20.0, "income": 1000.5, "platform": 7.0}
    request = {"platform": "ios"}
    # A feature of the same name as a slice key wins inside rules.
    assert slicer.rule_slices(rows[0], request) == {"young": "true", "ios": "false"}
    assert slicer.rule_slices({"age": 40}, request) == {"young": "false", "ios": "true"}


def test_features_from_bytes_and_int_columns_and_short_rows() -> None:
    slicer = _slicer()
    b = np.array([[b"31", b"mobile"]], dtype=object)
    assert slicer.row_features({"x": b}, 0) == {"age": "31", "income": "mobile"}
    i = np.array([[31, 52000, 1]], dtype=np.int64)
    feats = slicer.row_features({"x": i}, None)
    assert feats == {"age": 31, "income": 52000, "platform": 1}
    assert all(isinstance(v, int) for v in feats.values())
    assert slicer.row_features({"other": i}, 0) == {}
