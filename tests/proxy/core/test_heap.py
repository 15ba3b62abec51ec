"""proxy/core/heap.py: the start-up heap is taken out of the collector's full passes.

Each check runs in a child interpreter: ``gc.freeze`` is process-wide and permanent,
and freezing pytest's own heap would change every test that runs after this one.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_objects_alive_at_the_freeze_are_out_of_full_passes_later_ones_are_not() -> None:
    out = _run(
        """
        import gc
        from proxy.core.heap import freeze_heap

        kept = [[i] for i in range(50_000)]          # 50,001 tracked containers
        ids = {id(x) for x in kept}
        frozen = freeze_heap("test")
        tracked = {id(o) for o in gc.get_objects()}  # what a full pass traverses
        later = [[i] for i in range(1_000)]
        tracked_after = {id(o) for o in gc.get_objects()}
        print(frozen >= 50_001, gc.get_freeze_count() == frozen)
        print(len(ids & tracked), all(id(x) in tracked_after for x in later))
        """
    )
    assert out.split() == ["True", "True", "0", "True"]


def test_garbage_cycles_are_collected_before_the_freeze() -> None:
    # A cycle that is already garbage must not become permanent.
    out = _run(
        """
        import gc, weakref
        from proxy.core.heap import freeze_heap

        class Node:
            pass

        gc.disable()                      # nothing collects it before freeze_heap does
        a, b = Node(), Node()
        a.other, b.other = b, a
        ref = weakref.ref(a)
        del a, b
        print(ref() is not None)
        freeze_heap("test")
        print(ref() is None)
        """
    )
    assert out.split() == ["True", "True"]


def test_frozen_objects_are_still_freed_by_reference_counting() -> None:
    out = _run(
        """
        import weakref
        from proxy.core.heap import freeze_heap

        class Box:
            pass

        box = Box()
        ref = weakref.ref(box)
        freeze_heap("test")
        del box
        print(ref() is None)
        """
    )
    assert out.split() == ["True"]
