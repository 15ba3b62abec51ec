"""CPU affinity of serve's processes (``server.cpus``, ``shadow.worker_cpus``).

On a host where the shadow worker shares cores with the live path, the worker's bursts
of work (a pair's decoding, the recorder, the gates) take a core the live process was
about to be woken on, and a request waits for the scheduler: at concurrency 1 that is
most of the shadow row's added p99 (docs/benchmarks.md, "Issue 11 targets, session 14").
A lower priority does not remove it (the scheduler still lets a running task use its
slice). Cores of its own do, where the cores are the proxy's: the same mechanism as
nginx's ``worker_cpu_affinity`` or a Kubernetes static CPU-manager policy, per role.

Linux only (``sched_setaffinity``). A process's affinity is per thread: :func:`pin` sets
it on every thread the process has (the logging thread starts before serve), and threads
started later inherit it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from proxy.core.errors import ConfigError


def allowed() -> set[int]:
    """The CPUs this process may run on now (its affinity, e.g. a container's cpuset)."""
    if not hasattr(os, "sched_getaffinity"):
        return set()
    return set(os.sched_getaffinity(0))


def problems(cpus: Iterable[int] | None, setting: str, usable: set[int]) -> list[str]:
    """What is wrong with ``cpus`` (a configured list) on this host: CPUs outside the
    set this process may use, or no affinity call at all."""
    if cpus is None:
        return []
    if not hasattr(os, "sched_setaffinity"):
        return [f"{setting}: CPU affinity needs Linux (sched_setaffinity)"]
    outside = sorted(set(cpus) - usable)
    if outside:
        return [
            f"{setting}: CPU {', '.join(map(str, outside))} not in the set this process may"
            f" run on ({_ranges(usable)})"
        ]
    return []


def pin(cpus: Iterable[int], setting: str) -> None:
    """Run every thread of this process on ``cpus`` (and so every thread it starts).

    Not checked against :func:`allowed` here: a process may widen its affinity again
    within its cpuset (the shadow worker, spawned from a pinned live process); serve's
    preflight checked the settings against the set it started with."""
    wanted = set(cpus)
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError(f"{setting}: CPU affinity needs Linux (sched_setaffinity)")
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: the calling thread only
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, wanted)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot set CPU affinity: {exc}") from exc


def _ranges(cpus: set[int]) -> str:
    """0-3,6: the kernel's list format (``Cpus_allowed_list``)."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and runs[-1][1] == cpu - 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"
