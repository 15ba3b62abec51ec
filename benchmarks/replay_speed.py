"""`mirrorgate replay` end to end versus the gates alone, and `mirrorgate --help` wall time.

One run, one machine state: a paired-record file of N pairs (classification, 10
classes, two slice values, two features, half labelled; the candidate is the champion
plus small noise, spaced so the first stage's minimum duration is never reached and
the replay feeds every pair) is written once, then

- gates only: ``gates.replay.replay`` over records already in memory (each look's
  batch built from records, ``PairBatch.from_records``: the issue's reference rate);
- gates only, columns: ``gates.replay.replay_stream`` over the file's column blocks
  already in memory (each look's batch built from columns: the floor the streaming CLI
  path can reach, parsing excluded);
- end to end: the CLI's own code path (``proxy.cli.commands.replay.run``: the file streamed
  into column blocks while the gates decide, render), stdout discarded;
- the same end to end over the Parquet form of the file (``mirrorgate export`` writes
  it with ``--format parquet``) when pyarrow is installed;
- ``mirrorgate --help`` in a fresh interpreter, best of 5.

Rates are pairs per second; the ratio e2e / gates-only is what docs/benchmarks.md
quotes. The machine is shared: the load average is printed with the numbers.

    python benchmarks/replay_speed.py                 # 200k pairs
    python benchmarks/replay_speed.py --pairs 50000
    python benchmarks/replay_speed.py --pairs 30000 --repeat 3 --no-parquet  # best of 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gates.replay import replay, replay_stream  # noqa: E402
from proxy.cli.commands import replay as replay_cmd  # noqa: E402
from storage.files import read_pair_blocks, read_pairs  # noqa: E402


def write_file(path: Path, n: int) -> None:
    import orjson

    rng = np.random.default_rng(0)
    champ = rng.dirichlet(np.ones(10), size=n)
    cand = np.clip(champ + rng.normal(0, 0.002, size=champ.shape), 1e-6, None)
    cand /= cand.sum(axis=1, keepdims=True)
    labels = champ.argmax(axis=1)
    ages = rng.integers(18, 80, size=n)
    income = rng.normal(5e4, 1e4, size=n)
    with path.open("wb") as fh:
        for i in range(n):
            rec = {
                "id": f"r-{i}",
                "ts": 1_764_050_000.0 + i * 0.0005,
                "slices": {"platform": "web" if i % 2 else "mobile"},
                "features": {"age": int(ages[i]), "income": float(income[i])},
                "champion": {
                    "output": champ[i].round(6).tolist(),
                    "latency_ms": 3.2,
                    "error": None,
                },
                "candidate": {
                    "output": cand[i].round(6).tolist(),
                    "latency_ms": 4.1,
                    "error": None,
                },
                "label": int(labels[i]) if i % 2 == 0 else None,
            }
            fh.write(orjson.dumps(rec) + b"\n")


def timed(fn: Callable[[], T]) -> tuple[float, float, T]:
    """(wall seconds, process CPU seconds, value): CPU time is what other processes on a
    loaded machine do not inflate, so both are printed."""
    w0, c0 = time.perf_counter(), time.process_time()
    value = fn()
    return time.perf_counter() - w0, time.process_time() - c0, value


def gates_only(path: Path) -> tuple[float, float, int]:
    cfg = replay_cmd.load_replay_config(None)
    records = list(read_pairs(path))
    wall, cpu, result = timed(
        lambda: replay(
            records,
            [],
            gates=cfg.gates,  # what the CLI runs without --config: slice keys as they appear
            plan=cfg.rollout,
            task=cfg.task,
            join=replay_cmd.LabelJoin(label_window_s=cfg.label_window_s),
        )
    )
    return wall, cpu, result.pairs_fed


def gates_only_columns(path: Path) -> tuple[float, float, int]:
    cfg = replay_cmd.load_replay_config(None)
    blocks = list(read_pair_blocks(path))
    wall, cpu, result = timed(
        lambda: replay_stream(
            blocks,
            [],
            gates=cfg.gates,
            plan=cfg.rollout,
            task=cfg.task,
            join=replay_cmd.LabelJoin(label_window_s=cfg.label_window_s),
        )
    )
    return wall, cpu, result.pairs_fed


def end_to_end(path: Path) -> tuple[float, float]:
    args = argparse.Namespace(
        config=None, pairs=path, labels=None, json=True, quiet=True, read_all=False
    )
    with contextlib.redirect_stdout(io.StringIO()):
        wall, cpu, _ = timed(lambda: replay_cmd.run(args))
    return wall, cpu


def best_of_5(argv: list[str]) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=200_000, help="pairs in the file")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of (gates only, gates cols, end to end), interleaved; best of each",
    )
    parser.add_argument("--no-parquet", action="store_true", help="skip the Parquet row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.jsonl"
        write_file(path, args.pairs)
        print(
            f"file: {args.pairs} pairs, {path.stat().st_size / 1e6:.1f} MB; load {os.getloadavg()}"
        )
        # interleaved rounds: the load moves between measurements; the best of each is
        # the least disturbed
        rounds = []
        for _ in range(max(args.repeat, 1)):
            rounds.append((gates_only(path), gates_only_columns(path), end_to_end(path)))
        g = min(r[0][0] for r in rounds)
        g_cpu = min(r[0][1] for r in rounds)
        fed = rounds[0][0][2]
        c = min(r[1][0] for r in rounds)
        c_cpu = min(r[1][1] for r in rounds)
        fed_c = rounds[0][1][2]
        e = min(r[2][0] for r in rounds)
        e_cpu = min(r[2][1] for r in rounds)
        if len(rounds) > 1:
            each = ", ".join(f"{r[0][0] / r[2][0]:.2f}" for r in rounds)
            print(f"end to end / gates only (wall) per round: {each}")

        def row(name: str, wall: float, cpu: float, pairs: int) -> None:
            print(
                f"{name:<11}: {pairs / wall:8.0f} pairs/s wall ({wall:6.2f} s), "
                f"{pairs / cpu:8.0f} pairs/s CPU ({cpu:6.2f} s); "
                f"ratio to gates only: wall {g / wall:.2f}, CPU {g_cpu / cpu:.2f}"
            )

        row("gates only", g, g_cpu, fed)
        row("gates cols", c, c_cpu, fed_c)
        row("end to end", e, e_cpu, args.pairs)
        print(f"end to end / gates cols: wall {c / e:.2f}, CPU {c_cpu / e_cpu:.2f}")
        print(f"load {os.getloadavg()}")
        try:
            from storage.columnar import write_parquet
        except ImportError:
            write_parquet = None
        if write_parquet is not None and not args.no_parquet:
            pq = Path(tmp) / "pairs.parquet"
            write_parquet(pq, read_pairs(path))
            p, p_cpu = end_to_end(pq)
            row("parquet e2e", p, p_cpu, args.pairs)
    bare = best_of_5([sys.executable, "-c", "pass"])
    help_s = best_of_5([sys.executable, "-m", "proxy", "--help"])
    print(
        f"mirrorgate --help: {help_s * 1000:.0f} ms, bare interpreter start {bare * 1000:.0f} ms "
        f"(best of 5 each); load {os.getloadavg()}"
    )


if __name__ == "__main__":
    main()
