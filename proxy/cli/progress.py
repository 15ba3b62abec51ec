"""Progress bars for long commands (tqdm), on stderr, only where someone watches.

A bar is shown when stderr is a terminal and neither ``--quiet`` (``mirrorgate -q``) nor
``MIRRORGATE_PROGRESS=0`` says otherwise; in CI logs and pipes nothing is printed, so
output stays what scripts parse. tqdm is imported only when a bar is shown.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` on a subcommand too (``mirrorgate export pairs ... --quiet``)."""
    parser.add_argument(
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bar (also: mirrorgate -q, or stderr not a terminal)",
    )


def enabled(args: argparse.Namespace | None) -> bool:
    if args is not None and getattr(args, "quiet", False):
        return False
    if os.environ.get("MIRRORGATE_PROGRESS", "").lower() in ("0", "false", "no", "off"):
        return False
    return sys.stderr.isatty()


def track(
    iterable: Iterable[T],
    args: argparse.Namespace | None,
    *,
    desc: str,
    unit: str = "it",
    total: int | None = None,
) -> Iterable[T]:
    """``iterable`` itself (no extra layer), or wrapped in a bar when :func:`enabled`."""
    if not enabled(args):
        return iterable
    return _bar(iterable, desc=desc, unit=unit, total=total)


def _bar(iterable: Iterable[T], *, desc: str, unit: str, total: int | None) -> Iterator[T]:
    from tqdm import tqdm

    with tqdm(iterable, desc=desc, unit=unit, total=total, file=sys.stderr, leave=False) as bar:
        yield from bar


class Steps:
    """A bar over named steps (``with Steps(args, 3, "report") as step: step("collect")``)."""

    def __init__(self, args: argparse.Namespace | None, total: int, desc: str) -> None:
        self._bar: Any = None
        if enabled(args):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False)

    def __enter__(self) -> Steps:
        return self

    def __call__(self, name: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(name)
            self._bar.update(1)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
