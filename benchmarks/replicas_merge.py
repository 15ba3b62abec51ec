"""The decider's cost per step: snapshot size, and merge + evaluate of N replica snapshots.

Each replica's cumulative gate state (default gates, the gates' simulated traffic) is
serialised as the database stores it; the decider restores N of them, merges and
evaluates (what ``proxy.control.replicas.merged_engine`` + ``RolloutEngine.evaluate`` do every
``replicas.snapshot_every_s``). Medians over rounds.

Run from the repository root:
    PYTHONPATH=. python benchmarks/replicas_merge.py [--replicas 3 --pairs 3000 --rounds 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

from gates.engine import RolloutEngine
from gates.settings import GatesSettings, RolloutSettings
from gates.simulate import Scenario, records
from proxy.control.replicas import json_safe, merged_engine
from storage.entities import GateSnapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=3000, help="pairs per replica")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    gates, plan = GatesSettings(), RolloutSettings()
    snaps = []
    for i in range(args.replicas):
        recs = records(Scenario(), args.pairs, i)
        local = RolloutEngine(gates, plan, task="classification", start_ts=0.0)
        local.observe([dataclasses.replace(r, label=None) for r in recs])
        local.observe_labelled([r for r in recs if r.label is not None])
        blob = json.dumps(json_safe(local.state_dict()))
        snaps.append(GateSnapshot("r", f"r{i}", 0.0, 1.0, json.loads(blob), 1.0))
    sizes = [len(json.dumps(s.state)) for s in snaps]
    times = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        engine = merged_engine(
            None, snaps, gates=gates, plan=plan, task="classification", start_ts=0.0
        )
        engine.evaluate(1.0)
        times.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "replicas": args.replicas,
                "pairs_per_replica": args.pairs,
                "snapshot_bytes": max(sizes),
                "merge_and_evaluate_ms_median": round(statistics.median(times) * 1000, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
