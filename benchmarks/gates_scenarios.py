"""The statistical scenarios of issue 13 at the engine's REAL per-check budget.

    python benchmarks/gates_scenarios.py [--streams 200] [--pairs 60000] [--every 500]
        [--set slices.alpha_share=0.75 --set metric.recall.enabled=false ...] [--only TEXT]

Every row simulates ``--streams`` seeded streams of labelled pairs and decides them with
the engine's own rules and default settings (``GatesSettings()``): the ``metric.accuracy``
check (margin 0.01) on the aggregate and on every slice cell, FAIL at any n at the level
the engine fixes when a cell first appears (family weights, checks, ``alpha_share``,
admission order), PASS from ``min_samples`` with slices above ``require_share`` at the
widened margin. A look every ``--every`` pairs (the engine's cadence is 1000 pairs or
10 s, which is 500 pairs at 50 pairs/s). The drift rows run the real
``OutputDriftGate`` at its real budget on generated classification outputs, beside the
rule it replaced (significance against zero + a point-estimate effect size).

Null rows report the false-abort rate (target: <= alpha = 0.05 for the whole rollout,
the share is one check of the budget); regression rows the power within the stream and
the median pairs to abort; the last rows the pairs an equal candidate needs to leave
shadow with and without its 23 slice cells.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gates.batch import PairBatch  # noqa: E402
from gates.drift import OutputDriftGate  # noqa: E402
from gates.engine import family_budgets  # noqa: E402
from gates.settings import GatesSettings  # noqa: E402
from gates.simulate import SliceStreams, accuracy_check_alpha, run_accuracy_streams  # noqa: E402
from gates.stats import log_threshold, psi, ternary_log_e  # noqa: E402

THREE = {"web": 0.6, "ios": 0.3, "android": 0.1}
REGIONS = {f"r{i:02d}": 0.97 / 19 for i in range(19)} | {"r19": 0.03}
PLATFORMS = {"web": 0.5, "ios": 0.3, "android": 0.2}


def three(cand: tuple[float, float, float], **kw: object) -> SliceStreams:
    acc = {f"platform={k}": (0.9, a) for k, a in zip(THREE, cand, strict=True)}
    return SliceStreams(keys={"platform": THREE}, acc=acc, **kw)  # type: ignore[arg-type]


def twenty(drop: float = 0.0, **kw: object) -> SliceStreams:
    acc = {"region=r19": (0.9, 0.9 - drop)} if drop else {}
    return SliceStreams(keys={"region": REGIONS}, acc=acc, **kw)  # type: ignore[arg-type]


NULLS = {
    "A/A, 3 slices": three((0.9, 0.9, 0.9)),
    "boundary: -1 pt everywhere (= -margin), 3 slices": three((0.89, 0.89, 0.89)),
    "A/A, 20 slices (one at 3%)": twenty(),
    "A/A, 20 slices, labels 2000 pairs late and 40% missing": twenty(labelled=0.6, delay=2000),
    "boundary, traffic mix shifting (android 10% -> 50%)": three(
        (0.89, 0.89, 0.89), mix={"platform": {"web": 0.2, "ios": 0.3, "android": 0.5}}
    ),
    "both models degrading together (0.9 -> 0.75)": three((0.9, 0.9, 0.9), degrade=0.15),
}
POWER = {
    "docs' slice regression: -3 pts on 10% android, +1 elsewhere": three((0.91, 0.91, 0.87)),
    "aggregate regression: -3 pts everywhere": three((0.87, 0.87, 0.87)),
    "-15 pts on one of 20 slices at 3%": twenty(0.15),
    "-15 pts on the 3% slice, labels 2000 pairs late and 40% missing": twenty(
        0.15, labelled=0.6, delay=2000
    ),
    # what a budget moved from the aggregate to the slices costs: a uniform regression
    # just beyond the margin, which only the aggregate cell sees early
    "aggregate regression near the margin: -2 pts everywhere": three((0.88, 0.88, 0.88)),
}


def settings_with(overrides: list[str]) -> GatesSettings:
    """``GatesSettings`` with dotted ``path=value`` overrides (values read as JSON when they
    parse, else as strings): the policy variants the docs compare at the same seeds."""
    tree: dict[str, object] = {}
    for item in overrides:
        path, _, raw = item.partition("=")
        try:
            value: object = json.loads(raw)
        except ValueError:
            value = raw
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})  # type: ignore[assignment]
        node[leaf] = value
    return GatesSettings.model_validate(tree)


def fmt_pairs(x: float) -> str:
    return f"{x / 1000:.1f}k" if np.isfinite(x) else "never"


def accuracy_rows(
    streams: int,
    pairs: int,
    every: int,
    settings: GatesSettings,
    only: str = "",
    seed_offset: int = 0,
) -> list[str]:
    rows = []
    for i, (name, sc) in enumerate({**NULLS, **POWER}.items()):
        if only not in name:
            continue
        t = time.perf_counter()
        res = run_accuracy_streams(
            sc, settings, streams=streams, pairs=pairs, every=every, seed=2000 + i + seed_offset
        )
        at = res["fail_at"]
        rate = float(np.isfinite(at).mean())
        med = float(np.median(at[np.isfinite(at)])) if np.isfinite(at).any() else float("inf")
        kind = "false aborts" if name in NULLS else "power"
        extra = ""
        if name.startswith("-15"):
            named = float(np.mean(res["failed_cell"][np.isfinite(at)] == "region=r19"))
            extra = f"; abort names region=r19 in {named:.0%}"
        rows.append(f"| {name} | {kind} {rate:.3f} | {fmt_pairs(med)}{extra} |")
        print(f"  {name}: {time.perf_counter() - t:.1f}s", file=sys.stderr)
    return rows


def shadow_rows(streams: int, pairs: int, every: int, settings: GatesSettings) -> list[str]:
    """Equal candidate, 20 regions x 3 platforms (23 cells): pairs to leave shadow."""
    sc = SliceStreams(keys={"region": REGIONS, "platform": PLATFORMS})
    out = {}
    for sliced in (False, True):
        res = run_accuracy_streams(
            sc, settings, streams=streams, pairs=pairs, every=every, seed=3000,
            sliced=sliced, want_pass=True,
        )  # fmt: skip
        out[sliced] = res["pass_at"]
    agg, sl = out[False], out[True]
    both = np.isfinite(agg) & np.isfinite(sl)
    ratio = np.median(sl[both] / agg[both]) if both.any() else float("nan")
    med_agg = float(np.median(agg[np.isfinite(agg)])) if np.isfinite(agg).any() else np.inf
    med_sl = float(np.median(sl[np.isfinite(sl)])) if np.isfinite(sl).any() else np.inf
    return [
        f"| equal candidate, aggregate only | left shadow {np.isfinite(agg).mean():.3f} | "
        f"{fmt_pairs(med_agg)} |",
        f"| equal candidate, aggregate + 23 slice cells | left shadow "
        f"{np.isfinite(sl).mean():.3f} | {fmt_pairs(med_sl)}; median ratio per stream "
        f"{ratio:.2f}, ratio of medians {med_sl / med_agg:.2f} |",
    ]


def drift_rows(streams: int, settings: GatesSettings) -> list[str]:
    """Output share moved by 0.09 (limit 0.1): the real gate vs the rule it replaced."""
    cfg = settings.drift.output
    alpha = family_budgets(settings)["drift.output"]
    rows = []
    for shift, label in ((0.09, "inside the limit: 0.09 of 0.1"), (0.15, "beyond: 0.15")):
        rng = np.random.default_rng(4000)
        new_hits, old_hits, when = 0, 0, []
        for _ in range(streams):
            gate = OutputDriftGate(settings, alpha=alpha, task="classification")
            old_fired = False
            for look in range(20):
                n = 500
                champ = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
                move = (champ == 0) & (rng.random(n) < shift / 0.5)
                cand = np.where(move, 1, champ)
                eye = np.eye(3) * 0.8 + 0.1
                batch = PairBatch.from_arrays(
                    champion=eye[champ], candidate=eye[cand], ts=np.zeros(n)
                )
                gate.update(batch)
                (res,) = gate.results
                if res.status.value == "FAIL":
                    new_hits += 1
                    when.append((look + 1) * n)
                    break
                # the replaced rule: significant against 0 at alpha/(2m) AND point effect
                ch, ca = gate.counts["champion"], gate.counts["candidate"]
                both = gate.counts["both"]
                s1, s2 = ca - ch, ca + ch - 2 * both
                thr = log_threshold(alpha / 6)
                sig = (ternary_log_e(gate.n, s1, s2, 0.0, "greater") >= thr) | (
                    ternary_log_e(gate.n, s1, s2, 0.0, "less") >= thr
                )
                dist = float(np.max(np.abs(s1 / gate.n)))
                effect = dist >= cfg.ks or (cfg.psi is not None and psi(ch, ca) >= cfg.psi)
                if not old_fired and sig.any() and effect and gate.n >= cfg.min_samples:
                    old_fired = True
            old_hits += old_fired
        med = fmt_pairs(float(np.median(when))) if when else "never"
        kind = "false aborts" if shift < cfg.ks else "power"
        rows.append(
            f"| drift.output, share moved {label} | {kind} {new_hits / streams:.3f} | "
            f"{med}; the replaced rule: {old_hits / streams:.3f} |"
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--pairs", type=int, default=60_000)
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--shadow-pairs", type=int, default=100_000)
    p.add_argument(
        "--set", action="append", default=[], metavar="PATH=VALUE",
        help="a settings override, e.g. slices.alpha_share=0.75 (repeatable)",
    )  # fmt: skip
    p.add_argument("--only", default="", help="only the accuracy rows whose name contains this")
    p.add_argument("--seed-offset", type=int, default=0, help="added to every row's seed")
    args = p.parse_args()
    settings = settings_with(args.set)
    a_check = accuracy_check_alpha(settings)
    print(
        f"{args.streams} streams per row, {args.pairs} pairs, a look every {args.every} pairs; "
        f"default settings: alpha {settings.alpha}, metric.accuracy gets {a_check:.5f} "
        f"(aggregate {a_check * (1 - settings.slices.alpha_share):.5f}, slices share "
        f"{a_check * settings.slices.alpha_share:.5f} by order of appearance)"
        + (f"; overrides: {', '.join(args.set)}" if args.set else "")
        + "\n"
    )
    print("| scenario | rate | median pairs to abort / leave shadow |")
    print("|---|---|---|")
    t = time.process_time()
    for row in accuracy_rows(
        args.streams, args.pairs, args.every, settings, args.only, args.seed_offset
    ):
        print(row)
    if not args.only:
        for row in drift_rows(args.streams, settings):
            print(row)
        for row in shadow_rows(args.streams, args.shadow_pairs, args.every, settings):
            print(row)
    print(f"\nCPU {time.process_time() - t:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
