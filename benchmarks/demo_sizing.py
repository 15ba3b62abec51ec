#!/usr/bin/env python3
"""How many labelled pairs the demo's slice gates need, and whether the scenarios carry them.

    python benchmarks/demo_sizing.py [--margin 0.02] [--alpha 0.05] [--gates 4] [--runs 400]

For each candidate and platform it prints, from the shipped models on the held-out pool:
the paired accuracy difference Δ and discordance q; the planning estimate of
``proxy.demo.sizing``; the simulated distribution of the first look at which the
anytime-valid paired non-inferiority gate decides (pairs drawn i.i.d. from the pool's
slice, the gate watched after every pair); then, for the shipped ``fast`` and ``full``
scenarios, the label count and request at which each slice gate decides on the
scenario's own (fixed) traffic. The gate modelled is the one sketched in the gates brief
(Fan et al. mixture e-process, λ grid, two one-sided tests at alpha / (2 * gates) each);
the real gates may differ in detail (docs/gates.md), hence the safety factor in sizing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy.demo import assets  # noqa: E402
from proxy.demo.offline import OfflineModel  # noqa: E402
from proxy.demo.sizing import expected_pairs_to_decide, log_mixture_e  # noqa: E402
from proxy.demo.traffic import PRODUCTION_MIX, SCENARIOS, Traffic  # noqa: E402


def first_decision(diffs: np.ndarray, margin: float, alpha: float) -> np.ndarray:
    """For each row of paired differences [runs, n]: the 1-based index of the first look
    at which the gate decides (either side), signed +n for PASS and -n for FAIL, 0 if never."""
    if diffs.shape[0] > 25:  # bound memory: [runs, n, grid] floats
        return np.concatenate(
            [first_decision(diffs[i : i + 25], margin, alpha) for i in range(0, len(diffs), 25)]
        )
    boundary = -margin
    out = np.zeros(diffs.shape[0], dtype=np.int64)
    threshold = np.log(1.0 / alpha)
    for side, sign in (("above", 1), ("below", -1)):
        if side == "above":
            y = (diffs - boundary) / (1.0 + boundary)
        else:
            y = (boundary - diffs) / (1.0 - boundary)
        hit = log_mixture_e(np.cumsum(y, axis=1), np.cumsum(y * y, axis=1)) >= threshold
        first = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0)
        better = (first > 0) & ((out == 0) | (first < np.abs(out)))
        out[better] = sign * first[better]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--margin", type=float, default=0.02)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--gates", type=int, default=4, help="gates sharing alpha (Bonferroni)")
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--max-pairs", type=int, default=4000)
    args = parser.parse_args(argv)
    alpha_side = args.alpha / (2 * args.gates)
    pool = assets.load_pool()
    correct = {
        name: (OfflineModel(assets.model_path(name)).predict(pool.features) == pool.labels)
        for name in assets.MODEL_NAMES
    }
    champ = correct[assets.CHAMPION].astype(np.int64)
    diff_of = {
        cand: correct[cand].astype(np.int64) - champ
        for cand in (assets.CANDIDATE_REGRESSED, assets.CANDIDATE_GOOD)
    }
    print(
        f"margin {args.margin}, alpha {args.alpha} over {args.gates} gates x 2 sides "
        f"= {alpha_side:.5f} per side; {args.runs} simulated streams per slice"
    )
    print(
        "| candidate | platform | Δ | q | decision | planning estimate | "
        "simulated median | p90 | p99 | decided by max |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(12345)
    for cand, diff in diff_of.items():
        for platform in pool.platforms:
            d = diff[pool.rows_of(platform)]
            delta, q = float(d.mean()), float((d != 0).mean())
            est = expected_pairs_to_decide(delta, q, args.margin, alpha_side)
            draws = d[rng.integers(0, d.size, size=(args.runs, args.max_pairs))]
            first = first_decision(draws.astype(np.float64), args.margin, alpha_side)
            want = -1 if delta < -args.margin else 1
            right = np.where(np.sign(first) == want, np.abs(first), np.iinfo(np.int64).max)
            decided = right < np.iinfo(np.int64).max
            qs = np.quantile(right, [0.5, 0.9, 0.99]) if decided.any() else [np.inf] * 3
            fmt = [f"{v:.0f}" if np.isfinite(v) and v < 1e12 else f">{args.max_pairs}" for v in qs]
            print(
                f"| {cand} | {platform} | {delta:+.4f} | {q:.4f} | "
                f"{'FAIL' if want < 0 else 'PASS'} | {est:.0f} | {fmt[0]} | {fmt[1]} | "
                f"{fmt[2]} | {decided.mean():.3f} |"
            )
    print()
    print("Shipped scenarios (fixed traffic; labels in arrival order):")
    print(
        "| scenario | candidate | platform | labels on slice | decided | at label # | at request |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, settings in SCENARIOS.items():
        traffic = Traffic(settings, pool)
        labels = traffic.labels()
        lookup = {}
        for req in traffic.requests():
            for rid, row in zip(req.record_ids, req.pool_rows, strict=True):
                lookup[rid] = row
        rows = np.array([lookup[lab.id] for lab in labels])
        due = np.array([lab.due_seq for lab in labels])
        plat = pool.platform[rows]
        for cand, diff in diff_of.items():
            for k, platform in enumerate(pool.platforms):
                sel = np.flatnonzero(plat == k)
                first = first_decision(
                    diff[rows[sel]][None, :].astype(np.float64), args.margin, alpha_side
                )[0]
                verdict = "never" if first == 0 else ("PASS" if first > 0 else "FAIL")
                at = abs(int(first))
                req = "-" if first == 0 else str(int(due[sel[at - 1]]))
                print(
                    f"| {name} | {cand} | {platform} | {sel.size} | {verdict} | "
                    f"{at if first else '-'} | {req} |"
                )
    mix = " ".join(f"{p}={w}" for p, w in PRODUCTION_MIX.items())
    print(f"\nproduction mix: {mix}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
