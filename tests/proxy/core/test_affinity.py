"""The affinity settings' checks (proxy/core/affinity.py); pinning a real serve is
tests/proxy/cli/test_serve_affinity.py."""

from __future__ import annotations

import pytest

from proxy.core import affinity


def test_a_cpu_outside_the_allowed_set_is_named_with_the_set_in_the_kernels_format() -> None:
    found = affinity.problems([1, 9, 12], "shadow.worker_cpus", {0, 1, 2, 3, 6, 8})
    assert found == [
        "shadow.worker_cpus: CPU 9, 12 not in the set this process may run on (0-3,6,8)"
    ]
    assert affinity.problems([0, 3], "server.cpus", {0, 1, 2, 3}) == []
    assert affinity.problems(None, "server.cpus", set()) == []  # not configured: no check


@pytest.mark.parametrize(
    "cpus, text",
    [
        ({0}, "0"),
        ({0, 1}, "0-1"),
        ({0, 2}, "0,2"),
        ({5, 1, 2, 3, 9, 10}, "1-3,5,9-10"),
        (set(), "none"),
    ],
)
def test_cpu_sets_read_as_the_kernel_writes_them(cpus: set[int], text: str) -> None:
    assert affinity._ranges(cpus) == text
