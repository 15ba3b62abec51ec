"""Bounded inflate (proxy/core/inflate.py) against zlib/gzip as the oracle."""

from __future__ import annotations

import gzip
import os
import zlib

import pytest

from proxy.core.inflate import DECODE_STEP, GZIP_WBITS, TooLarge, deflate_wbits, inflate


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize("size", [0, 1, DECODE_STEP - 1, DECODE_STEP, 3 * DECODE_STEP + 7])
def test_round_trips_what_zlib_and_gzip_encode(size: int) -> None:
    data = os.urandom(size // 2) + b"a" * (size - size // 2)
    assert inflate(gzip.compress(data), GZIP_WBITS, size) == data
    wrapped = zlib.compress(data)
    assert inflate(wrapped, deflate_wbits(wrapped), size) == data
    raw = _raw_deflate(data)
    assert inflate(raw, -zlib.MAX_WBITS, size) == data


def test_every_gzip_member_is_read_as_gzip_does() -> None:
    two = gzip.compress(b"first ") + gzip.compress(b"second")
    assert inflate(two, GZIP_WBITS, 100) == gzip.decompress(two) == b"first second"


def test_a_bomb_stops_one_step_past_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (64 * DECODE_STEP))
    with pytest.raises(TooLarge):
        inflate(bomb, GZIP_WBITS, DECODE_STEP)
    # exactly the limit is allowed
    assert len(inflate(bomb, GZIP_WBITS, 64 * DECODE_STEP)) == 64 * DECODE_STEP


def test_stop_returns_the_prefix_only() -> None:
    data = bytes(range(256)) * 1000
    assert inflate(gzip.compress(data), GZIP_WBITS, 10, stop=5) == data[:5]


@pytest.mark.parametrize(
    "raw, wbits",
    [
        (gzip.compress(b"x" * 1000)[:-6], GZIP_WBITS),  # truncated
        (b"not compressed at all", GZIP_WBITS),
        (zlib.compress(b"abc") + b"junk", zlib.MAX_WBITS),  # bytes after deflate's end
    ],
)
def test_what_is_not_the_coding_is_a_zlib_error(raw: bytes, wbits: int) -> None:
    with pytest.raises(zlib.error):
        inflate(raw, wbits, 1 << 20)
