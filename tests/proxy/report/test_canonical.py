"""The sign-off digest is over RFC 8785 canonical JSON, checked by an independent JCS
implementation (the ``jcs`` package) and by the RFC's own number examples; written
report and export files get the umask's mode, not mkstemp's 0600."""

import hashlib
import json
import os
import stat
from pathlib import Path

import jcs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.errors import BadRequest
from proxy.report.build import write_pack
from proxy.report.document import canonical_json, report_digest
from storage.files import write_pairs
from tests.storage.factories import make_record

SAMPLE = Path(__file__).with_name("sample_report.json")

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), json_values, max_size=6))
def test_canonical_json_equals_an_independent_jcs(doc):
    assert canonical_json(doc) == jcs.canonicalize(doc)


@pytest.mark.parametrize(
    ("number", "text"),
    [  # RFC 8785 section 3.2.2.3 / appendix B examples of ECMAScript number formatting
        (0.0, "0"),
        (-0.0, "0"),
        (1e21, "1e+21"),
        (1e-7, "1e-7"),
        (0.000001, "0.000001"),
        (333333333.33333329, "333333333.3333333"),
        (1e23, "1e+23"),
        (4.50, "4.5"),
        (2e-3, "0.002"),
        (9007199254740991, "9007199254740991"),
    ],
)
def test_number_formatting_follows_the_rfc(number, text):
    assert canonical_json({"n": number}) == b'{"n":' + text.encode() + b"}"


def test_keys_sort_by_utf16_code_units():
    # U+1F600 is a surrogate pair (D83D ...) and sorts before U+E9FF..U+FFFF in UTF-16,
    # after them in code points: the RFC's order is UTF-16's.
    doc = {"\ufb01": 1, "\U0001f600": 2, "a": 3}
    assert list(json.loads(canonical_json(doc))) == ["a", "\U0001f600", "\ufb01"]


def test_unrepresentable_values_are_bad_requests():
    with pytest.raises(BadRequest):
        canonical_json({"x": float("nan")})
    with pytest.raises(BadRequest):
        canonical_json({"x": 2**60})


def test_report_digest_is_sha256_of_jcs_without_signoffs():
    doc = json.loads(SAMPLE.read_text())
    signed = {k: v for k, v in doc.items() if k != "signoffs"}
    assert report_digest(doc) == hashlib.sha256(jcs.canonicalize(signed)).hexdigest()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        pack = write_pack(json.loads(SAMPLE.read_text()), tmp_path / "pack")
        write_pairs(tmp_path / "pairs.jsonl", [make_record(1)])
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert _mode(pack.json_path) == expected
    assert _mode(pack.html_path) == expected
    assert _mode(tmp_path / "pairs.jsonl") == expected
