#!/usr/bin/env python3
"""Write a demo scenario as a paired-record JSONL file (and a labels file), for replay.

    python scripts/write_demo_pairs.py --candidate regressed --out pairs.jsonl \\
        [--labels labels.jsonl] [--mode fast|full] [--seed N] [--no-features]
    mirrorgate replay --pairs pairs.jsonl --labels labels.jsonl

Runs the shipped champion and the chosen candidate in-process on the scenario's traffic
(``proxy.demo.recorded``). Exit code 0 on success, 2 on bad arguments or output paths.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy.demo import assets  # noqa: E402
from proxy.demo.recorded import write_pairs_jsonl  # noqa: E402
from proxy.demo.traffic import SCENARIOS, Traffic, scenario  # noqa: E402

CANDIDATES = {"regressed": assets.CANDIDATE_REGRESSED, "good": assets.CANDIDATE_GOOD}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidate", choices=sorted(CANDIDATES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="paired-record JSONL file")
    parser.add_argument("--labels", type=Path, help="labels JSONL (default: labels inline)")
    parser.add_argument("--mode", choices=sorted(SCENARIOS), default="fast")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-features", action="store_true", help="omit the 64 pixel features")
    args = parser.parse_args(argv)
    for path in (args.out, args.labels):
        if path is not None and not path.parent.is_dir():
            print(f"error: folder {path.parent} does not exist", file=sys.stderr)
            return 2
    if args.labels is not None and args.labels.resolve() == args.out.resolve():
        print("error: --labels must differ from --out", file=sys.stderr)
        return 2
    traffic = Traffic(scenario(args.mode, seed=args.seed, id_prefix=args.candidate))
    written = write_pairs_jsonl(
        args.out,
        traffic,
        assets.model_path(assets.CHAMPION),
        assets.model_path(CANDIDATES[args.candidate]),
        labels_path=args.labels,
        include_features=not args.no_features,
    )
    where = f" and {written.labels_path}" if written.labels_path else " (labels inline)"
    print(f"wrote {written.pairs} pairs, {written.labels} labels to {written.pairs_path}{where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
