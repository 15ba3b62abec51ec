"""Replay throughput: paired records per second through the gates, as ``mirrorgate replay``.

Generates labelled paired records with the gates' simulator (an A/A scenario: three
slices, 3 classes, both models alike, so no early decision cuts the run short), writes
them as the paired-record JSON Lines of DESIGN.md, then times, side by side in one run:
parsing the file (``PairRecord.from_dict`` per line) and feeding the parsed records
through ``gates.replay.replay`` — the same runner, engine and gates the proxy runs online
— with ``stop_at_decision=False`` so every record is evaluated.

    python benchmarks/replay_throughput.py [--pairs 20000 100000]

Indicative numbers on a shared machine; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gates.records import PairRecord  # noqa: E402
from gates.replay import replay  # noqa: E402
from gates.settings import GatesSettings, RolloutSettings  # noqa: E402
from gates.simulate import Scenario, records  # noqa: E402


def run(n: int, tmp: Path) -> dict[str, float]:
    recs = records(Scenario.aa(), n, seed=1)
    path = tmp / f"pairs-{n}.jsonl"
    with path.open("w") as f:
        for r in recs:
            f.write(json.dumps(r.to_dict()) + "\n")
    start = time.perf_counter()
    with path.open() as f:
        parsed = [PairRecord.from_dict(json.loads(line)) for line in f]
    parse_s = time.perf_counter() - start
    start = time.perf_counter()
    result = replay(parsed, gates=GatesSettings(), plan=RolloutSettings(), stop_at_decision=False)
    replay_s = time.perf_counter() - start
    return {
        "pairs": n,
        "file_mb": path.stat().st_size / 1e6,
        "parse_pairs_per_s": n / parse_s,
        "replay_pairs_per_s": n / replay_s,
        "end_to_end_pairs_per_s": n / (parse_s + replay_s),
        "evaluations": float(len(result.decisions)),
        "pairs_fed": float(result.pairs_fed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[20_000, 100_000])
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, 1-min load {os.getloadavg()[0]:.2f}"
    )
    print("| pairs | file MB | parse pairs/s | replay pairs/s | end-to-end pairs/s |")
    print("|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="mirrorgate-replay-") as tmp:
        for n in args.pairs:
            row = run(n, Path(tmp))
            assert row["pairs_fed"] == n, row
            print(
                f"| {n} | {row['file_mb']:.1f} | {row['parse_pairs_per_s']:.0f} | "
                f"{row['replay_pairs_per_s']:.0f} | {row['end_to_end_pairs_per_s']:.0f} |"
            )


if __name__ == "__main__":
    main()
