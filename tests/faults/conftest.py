"""Fixtures for the fault suite: the proxy tests' real V2 upstreams and in-process proxy.

Re-exported from ``tests/proxy/conftest.py`` (fixtures are per-directory in pytest) so
the fault tests drive exactly the servers the proxy tests do.
"""

from __future__ import annotations

from tests.proxy.conftest import live_path, start_proxy, start_upstream

__all__ = ["live_path", "start_proxy", "start_upstream"]
