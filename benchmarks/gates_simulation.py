"""False-abort rate, power and time-to-detect of mirrorgate's rule beside two naive rules,
on the same simulated streams; then replay throughput.

    python benchmarks/gates_simulation.py [--streams 2000] [--pairs 60000] [--replay 200000]

Part 1 simulates paired correctness for three slices (60% web, 30% ios, 10% android),
champion accuracy 0.9, correctness agreement 0.7, and evaluates every rule after every
``--every`` pairs (a look; the default cadence is 1000). The check is the paired accuracy
non-inferiority check with margin 0.01 on the aggregate and on each slice. Rules:

* mirrorgate: the betting e-process of ``gates.base.decide`` per cell at the engine's real
  level for ``metric.accuracy`` under the default settings (family weights, checks, the
  aggregate's share, slice cells by order of appearance), abort at the first look where a
  cell FAILs, at any n (no floor);
* fixed-sample test at every look: a one-sided z-test of ``H0: delta >= -margin`` per cell,
  same Bonferroni split over cells (so multiplicity over slices is controlled) but
  re-run at every look as if each were the only one;
* threshold on the running metric (a Flagger/Argo metric check with ``min: -margin``):
  abort when the running difference is below ``-margin`` at a look; with failure limit 1
  and with 5 consecutive failed checks.

The naive rules act only once a cell holds its minimum sample size (200 aggregate, 300
per slice); mirrorgate's FAIL needs none. Part 2 writes a paired-record file and times
the replay path.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import norm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gates.base import decide  # noqa: E402
from gates.batch import PairBatch  # noqa: E402
from gates.engine import RolloutEngine  # noqa: E402
from gates.replay import replay  # noqa: E402
from gates.settings import GatesSettings, RolloutSettings  # noqa: E402
from gates.simulate import Scenario, accuracy_check_alpha, admission_alphas, records  # noqa: E402
from storage.files import read_pairs  # noqa: E402

ALPHA, MARGIN, AGREEMENT = 0.05, 0.01, 0.7
SHARES = np.array([0.6, 0.3, 0.1])
CELLS = ["*", "platform=web", "platform=ios", "platform=android"]
MIN_N = np.array([200, 300, 300, 300])
SCENARIOS = {
    "A/A (candidate = champion)": (0.9, 0.9, 0.9),
    "boundary (-1 pt everywhere = -margin)": (0.89, 0.89, 0.89),
    "slice regression (-3 pts on 10% slice, +1 elsewhere)": (0.91, 0.91, 0.87),
    "aggregate regression (-3 pts everywhere)": (0.87, 0.87, 0.87),
}
RULES = ["mirrorgate (anytime)", "fixed-sample test each look", "threshold", "threshold x5"]


def discordance(acc_c: float, acc_a: float) -> tuple[float, float]:
    """P(d = -1), P(d = +1) for correctness drawn like ``gates.simulate``."""
    minus = AGREEMENT * max(0.0, acc_c - acc_a) + (1 - AGREEMENT) * acc_c * (1 - acc_a)
    plus = AGREEMENT * max(0.0, acc_a - acc_c) + (1 - AGREEMENT) * (1 - acc_c) * acc_a
    return minus, plus


def simulate_rules(
    cand: tuple[float, float, float], streams: int, pairs: int, every: int, seed: int
) -> dict[str, tuple[float, float]]:
    looks = np.arange(every, pairs + 1, every) - 1
    settings = GatesSettings()
    a_check = accuracy_check_alpha(settings)  # the engine's real budget for the check
    probs = [discordance(0.9, a) for a in cand]
    rng = np.random.default_rng(seed)
    first = {r: np.full(streams, np.inf) for r in RULES}
    for part in np.array_split(np.arange(streams), max(1, streams // 100)):
        r = len(part)
        s = rng.choice(3, size=(r, pairs), p=SHARES)
        u = rng.random((r, pairs))
        p_minus = np.array([p[0] for p in probs])[s]
        p_plus = np.array([p[1] for p in probs])[s]
        d = np.where(u < p_minus, -1.0, np.where(u < p_minus + p_plus, 1.0, 0.0))
        hits = {rule: np.zeros((r, len(looks)), dtype=bool) for rule in RULES}
        # slice cells get their level when they first appear, as in the engine
        first_row = {
            CELLS[j + 1]: np.where((s == j).any(axis=1), np.argmax(s == j, axis=1), np.inf)
            for j in range(3)
        }
        by_cell = admission_alphas(settings, a_check, first_row)
        cell_alphas = [np.full(r, a_check * (1 - settings.slices.alpha_share))] + [
            by_cell[c] for c in CELLS[1:]
        ]
        for c, mask in enumerate([np.ones_like(s, bool), s == 0, s == 1, s == 2]):
            alpha = np.repeat(cell_alphas[c], len(looks)).reshape(r, len(looks))
            n = np.cumsum(mask, axis=1)[:, looks].astype(float)
            s1 = np.cumsum(d * mask, axis=1)[:, looks]
            s2 = np.cumsum(d * d * mask, axis=1)[:, looks]
            ok = n >= MIN_N[c]
            dec = decide(
                "ternary", n.ravel(), s1.ravel(), s2.ravel(), -MARGIN, alpha.ravel(), ALPHA, "low"
            )
            hits[RULES[0]] |= dec.fail.reshape(n.shape)  # no floor: valid from n = 1
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = s1 / n
                sd = np.sqrt(np.maximum(s2 / n - mean**2, 1e-12) / n)
                z = (mean + MARGIN) / sd
            hits[RULES[1]] |= (z < norm.ppf(alpha)) & ok
            below = (mean < -MARGIN) & ok
            hits[RULES[2]] |= below
            run = np.zeros_like(below, dtype=int)  # consecutive failed checks
            for j in range(below.shape[1]):
                run[:, j] = np.where(below[:, j], (run[:, j - 1] if j else 0) + 1, 0)
            hits[RULES[3]] |= run >= 5
        for rule in RULES:
            h = hits[rule]
            at = np.where(h.any(axis=1), (looks[np.argmax(h, axis=1)] + 1).astype(float), np.inf)
            first[rule][part] = at
    out = {}
    for rule in RULES:
        at = first[rule]
        rate = float(np.isfinite(at).mean())
        median = float(np.median(at[np.isfinite(at)])) if np.isfinite(at).any() else float("nan")
        out[rule] = (rate, median)
    return out


def part1(streams: int, pairs: int, every: int) -> str:
    lines = [
        f"{streams} streams x {pairs} pairs, a look every {every} pairs, margin {MARGIN}, "
        f"the engine's real budget for metric.accuracy ({accuracy_check_alpha(GatesSettings()):.5f}"
        f" of alpha {ALPHA}); cells: aggregate + 3 slices",
        "",
        "| scenario | " + " | ".join(RULES) + " |",
        "|---" * (len(RULES) + 1) + "|",
    ]
    for i, (name, cand) in enumerate(SCENARIOS.items()):
        t = time.perf_counter()
        res = simulate_rules(cand, streams, pairs, every, seed=1000 + i)
        cells = []
        for rule in RULES:
            rate, median = res[rule]
            when = f", median {median / 1000:.0f}k pairs" if np.isfinite(median) else ""
            cells.append(f"{rate:.3f}{when}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(f"  {name}: {time.perf_counter() - t:.1f}s", file=sys.stderr)
    lines += [
        "",
        "Rows 1-2: false-abort rate (the candidate is not worse than the margin); "
        "rows 3-4: power (share aborted within the stream) and median pairs to abort.",
    ]
    return "\n".join(lines)


def part2(n: int) -> str:
    sc = Scenario.slice_regression(drop=-0.02, gain=0.02, rate_per_s=500.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.jsonl"
        with path.open("w") as fh:
            for start in range(0, n, 50_000):
                for r in records(sc, min(50_000, n - start), seed=start, t0=1.7e9 + start / 500):
                    fh.write(json.dumps(r.to_dict()) + "\n")
        rows = []

        def timed(label: str, fn: object) -> object:
            w, c = time.perf_counter(), time.process_time()
            out = fn()  # type: ignore[operator]
            w, c = time.perf_counter() - w, time.process_time() - c
            rows.append(f"| {label} | {n / w:,.0f} | {n / c:,.0f} |")
            return out

        recs = timed(
            "parse JSONL to PairRecord (storage.files.read_pairs)", lambda: list(read_pairs(path))
        )
        assert isinstance(recs, list)
        gates = GatesSettings()  # keys and values as they appear, as online

        def updates() -> None:
            eng = RolloutEngine(gates, RolloutSettings(), start_ts=recs[0].ts)
            for i in range(0, n, 1000):
                batch = PairBatch.from_records(recs[i : i + 1000])
                eng.observe(batch)
                eng.observe_labelled(batch)

        timed("all gates' updates, no evaluation (JSON excluded)", updates)
        result = timed(
            "replay: gates + engine, evaluation every 1000 pairs / 10 s (JSON excluded)",
            lambda: replay(recs, gates=gates, plan=RolloutSettings(), stop_at_decision=False),
        )
        timed(
            "replay including JSON parsing (what `mirrorgate replay` does)",
            lambda: replay(
                list(read_pairs(path)), gates=gates, plan=RolloutSettings(), stop_at_decision=False
            ),
        )
        verdict = getattr(result, "evaluation").verdict  # noqa: B009
    return "\n".join(
        [
            f"{n} labelled pairs at 500 pairs/s of record time, default gate set, "
            f"3 slice values; final verdict {verdict}",
            "",
            "| path | pairs/s (wall) | pairs/s (CPU) |",
            "|---|---|---|",
            *rows,
        ]
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=2000)
    p.add_argument("--pairs", type=int, default=60_000)
    p.add_argument("--every", type=int, default=1000)
    p.add_argument("--replay", type=int, default=200_000, help="pairs in the replay file")
    args = p.parse_args()
    print("## Decision rules on the same simulated streams\n")
    print(part1(args.streams, args.pairs, args.every))
    print("\n## Replay throughput\n")
    print(part2(args.replay))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
