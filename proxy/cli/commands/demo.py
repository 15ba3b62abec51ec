"""``mirrorgate demo``: two real rollouts through the real proxy, verdicts and validation packs.

Nothing to configure: the embedded default config (written into the run directory so it
can be read and reused), SQLite in the run directory, the proxy on a free loopback port
in this process, the shipped ONNX models in-process (``proxy/demo/assets``), and the
seeded digits traffic (``proxy.demo.traffic``) sent over HTTP with its slice headers and
delayed labels. Two rollouts run one after the other against the same champion:

1. ``candidate_regressed`` - better on aggregate, much worse on ``platform=mobile``:
   the online gates must ABORT it, naming the slice and the statistic;
2. ``candidate_good`` - better everywhere: it must go shadow -> canary-5 -> canary-25
   and be PROMOTED.

Each rollout stops at its verdict; its validation pack (report.html + report.json) is
built from the database (``proxy.report.collect``) and written into the run directory.
Exit code 0 when both verdicts are the expected ones, 1 when not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import yaml

from proxy.core.errors import BadRequest, MirrorgateError

DB_NAME = "mirrorgate.sqlite"
MODEL_NAME = "digits"
CONCURRENCY = 8
PROGRESS_EVERY_S = 1.0
# The demo's gate set, the one tests/proxy/control/test_rollout_online.py uses (docs/demo.md,
# "Gate set" says why each choice): paired accuracy overall and per platform decides,
# with the margin the traffic is sized for; score-shape checks are evidence because the
# champion (softmax regression) and the candidates (MLPs) are calibrated differently by
# construction; per-class recall needs ~10x this traffic to decide.
DEMO_GATES: dict[str, Any] = {
    # A retrained candidate (docs/gates.md "Presets"); the keys below say it explicitly.
    "preset": "retrained",
    "metric": {
        "accuracy": {"margin": 0.02},
        "recall": {"blocking": False},
        "high_confidence_error": {"blocking": False},
    },
    "tolerance": {"blocking": False},
    # Latency is evidence here, not a blocker: proxy, client and both models share two busy
    # cores in one machine, so the in-process latency measures scheduling, not the models
    # (both run in well under a millisecond offline), and a load transient at the start of
    # a run breaks the i.i.d. assumption of the quantile confidence sequences (docs/demo.md).
    "latency": {"blocking": False},
}
# Stages sized to the traffic (the gates' evidence carries over; a stage's minimums count
# from its start). Shadow needs 2,000 labels: at the production mix that is ~400 labelled
# mobile pairs (sd ~18), safely above the slice cells' minimum sample size (300), so no
# slice is still exempt (too small to decide) when the first canary traffic reaches
# users. Each canary stage then needs its own 1,000 pairs and 500 labels.
DEMO_PLAN: dict[str, Any] = {
    "stages": [
        {"name": "shadow", "canary_weight": 0.0, "min_pairs": 2500, "min_labels": 2000},
        {"name": "canary-5", "canary_weight": 0.05, "min_pairs": 1000, "min_labels": 500},
        {"name": "canary-25", "canary_weight": 0.25, "min_pairs": 1000, "min_labels": 500},
    ],
    "evaluate_every_pairs": 500,
    "evaluate_every_s": 5.0,
}
for _stage in DEMO_PLAN["stages"]:
    _stage["min_duration_s"] = 0  # a demo cannot wait minutes; a real plan would


# Requests each rollout may send (it stops at its verdict, usually far earlier). The fast
# scenario's own 1,500 requests carry 2,188 labelled mobile pairs, and on that traffic the
# regressed candidate's mobile FAIL needs ~1,900 of them with the engine's real per-cell
# error budget (docs/demo.md, "Sizing"): too close to the end, so the fast demo draws
# twice the requests from the same model of traffic.
MAX_REQUESTS = {"fast": 3000, "full": 5000}


@dataclass(frozen=True, slots=True)
class Scenario:
    key: str  # short name: config file, pack folder, request-id prefix
    candidate: str  # shipped model name
    expected: str  # the verdict the story expects
    failing: str | None = None  # ... and, for an abort, the gate cell that must fail


SCENARIOS = (
    Scenario("regressed", "candidate_regressed", "abort", "metric.accuracy[platform=mobile]"),
    Scenario("good", "candidate_good", "promote"),
)


@dataclass
class Outcome:
    scenario: Scenario
    rollout_id: str
    verdict: str
    reason: str
    stage: str
    stages_seen: list[str]
    failing: list[str]
    pairs: int
    labels: int
    requests: int
    elapsed_s: float
    harvested: int = 0
    shadow_dropped: int = 0
    pack: Path | None = None
    digest: str = ""

    @property
    def as_expected(self) -> bool:
        if self.verdict != self.scenario.expected:
            return False
        return self.scenario.failing is None or self.scenario.failing in self.failing


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="run the demo: two rollouts of real models through the real proxy",
        description="Run two rollouts against the shipped digits champion through the real "
        "proxy on a free local port: a candidate worse on one slice (aborted) and a good "
        "one (promoted). Writes the config, a SQLite database and each validation pack into "
        "the run directory. Exit 0 when both verdicts are the expected ones, 1 otherwise, "
        "2 on bad input.",
    )
    parser.add_argument(
        "--fast", action="store_true", help="the CI scenario (fewer, larger requests)"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="run directory (default ./runs/demo-<UTC time>); must not hold a demo run",
    )
    parser.add_argument("--seed", type=int, help="re-seed the traffic (default: the shipped seed)")
    parser.add_argument(
        "--verbose", action="store_true", help="keep the proxy's log lines on the terminal"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        # The bundled models are ONNX: the core install (http backends only) cannot run them.
        raise MirrorgateError(
            "the demo runs bundled ONNX models and needs onnxruntime: "
            "pip install 'mirrorgate[onnx]'"
        )
    quiet = () if args.verbose else ("proxy", "storage", "gates", "aiohttp", "alembic")
    previous = {name: logging.getLogger(name).level for name in quiet}
    # The demo's own lines are the output; the proxy's INFO logs would bury them.
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        run_dir = _run_dir(args.out)
        return asyncio.run(
            run_demo(run_dir, mode="fast" if args.fast else "full", seed=args.seed, out=sys.stdout)
        )
    finally:
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)


def _run_dir(out: str | None) -> Path:
    if out is None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        base = Path("runs") / f"demo-{stamp}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    else:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise BadRequest(f"--out {out}: exists and is not a directory")
        if (path / DB_NAME).exists():
            raise BadRequest(
                f"--out {out} already holds a demo run ({DB_NAME}); choose a new directory"
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadRequest(f"cannot create the run directory {path}: {exc.strerror}") from exc
    return path.resolve()


def demo_config_data(run_dir: Path, candidate: str, token: str) -> dict[str, Any]:
    """The embedded default config of one rollout (written to ``<run>/<key>.yaml``)."""
    from proxy.demo.assets import model_path

    def model(name: str) -> dict[str, Any]:
        # One intra-op thread each: two small models on a small machine, and the proxy's
        # event loop needs a core too.
        return {"name": name, "kind": "onnx", "path": str(model_path(name)), "threads": 1}

    return {
        "server": {
            "host": "127.0.0.1",
            "port": 0,
            "model_name": MODEL_NAME,
            "control_token": token,
        },
        "models": {"champion": model("champion"), "candidate": model(candidate)},
        # Shadow calls in flight at most the backend's worker threads (4): the others wait
        # in the mirror's queue, where their wait is not part of the latency the gate
        # compares. With the default 64 in flight they queue inside the backend's thread
        # pool instead, and on a loaded machine the candidate's latency measured the
        # backlog (a fast run aborted the regressed candidate on latency.p99 at 3x).
        "mirror": {"max_in_flight": 4},
        "slices": {"headers": ["platform"]},
        "storage": {"url": f"sqlite:///{run_dir / DB_NAME}"},
        "gates": DEMO_GATES,
        "rollout": DEMO_PLAN,
    }


def _write_config(run_dir: Path, scenario: Scenario, token: str) -> Path:
    path = run_dir / f"{scenario.key}.yaml"
    header = (
        f"# mirrorgate demo: champion vs {scenario.candidate} (written by `mirrorgate demo`).\n"
        f"# Reuse it: mirrorgate serve --config {path.name}   "
        f"mirrorgate report --rollout R --config {path.name} --out DIR\n"
    )
    body = yaml.safe_dump(demo_config_data(run_dir, scenario.candidate, token), sort_keys=False)
    path.write_text(header + body)
    return path


# ----------------------------------------------------------------------------- running


async def run_demo(run_dir: Path, *, mode: str, seed: int | None, out: TextIO) -> int:
    from proxy.core.config import load_config

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    started = time.perf_counter()
    token = secrets.token_urlsafe(16)
    say(f"mirrorgate demo ({mode}): run directory {run_dir}")
    say(f"  database {run_dir / DB_NAME}")
    outcomes = []
    for i, scenario in enumerate(SCENARIOS, start=1):
        config_path = _write_config(run_dir, scenario, token)
        # The embedded default, as written: environment overrides are not applied (a
        # MIRRORGATE_STORAGE__URL meant for production must not receive demo traffic).
        config = load_config(config_path, env={})
        say()
        say(f"== rollout {i}/{len(SCENARIOS)}: champion vs {scenario.candidate} ==")
        say(f"  config {config_path}")
        outcome = await _rollout(config, scenario, mode=mode, seed=seed, say=say)
        _write_report(outcome, config_path, run_dir, say)
        outcomes.append(outcome)
    elapsed = time.perf_counter() - started
    return _summary(outcomes, run_dir, elapsed, say)


async def _rollout(
    config: Any, scenario: Scenario, *, mode: str, seed: int | None, say: Callable[..., None]
) -> Outcome:
    from aiohttp import web
    from prometheus_client import CollectorRegistry

    from proxy.dataplane.state import STATE
    from proxy.server.app import create_app, wait_loaded

    planned = MAX_REQUESTS[mode]
    registry = CollectorRegistry()
    app = create_app(config, storage=True, registry=registry)
    state = app[STATE]
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    started = time.perf_counter()
    live: dict[str, Any] = {}
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        await wait_loaded(app)
        await _warm_up(state.champion, state.candidate)
        service, persistence = state.rollout, state.persistence
        assert service is not None and persistence is not None
        rollout_id = persistence.rollout_id
        say(f"  proxy http://{host}:{port}  rollout {rollout_id}  ({planned:,} requests max)")

        def final() -> bool:
            latest = service.latest
            return latest is not None and latest.verdict in ("promote", "abort")

        async def progress() -> None:
            while True:
                await asyncio.sleep(PROGRESS_EVERY_S)
                say(_progress_line(service.latest, live.get("stats"), started))

        ticker = asyncio.create_task(progress())
        try:
            stats = await _drive_in_child(
                f"http://{host}:{port}",
                config.server.control_token.get_secret_value(),
                scenario,
                mode=mode,
                seed=seed,
                live=live,
                final=final,
            )
            if not final():
                # Traffic ran out first: one last look at everything that arrived.
                await asyncio.sleep(service.tick_s * 2)
                await service.evaluate_now()
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        evaluation = service.current()
        say(_progress_line(evaluation, stats, started))
        failing = _failing_at_verdict(service.engine.decisions)
        outcome = Outcome(
            scenario=scenario,
            rollout_id=rollout_id,
            verdict=evaluation.verdict,
            reason=evaluation.reason,
            stage=evaluation.stage,
            # From the engine's decisions, not the progress lines: a stage can pass
            # between two of them.
            stages_seen=[service.engine.plan.stages[0].name]
            + [d.to_stage for d in service.engine.decisions if d.action == "advance"],
            failing=failing,
            pairs=evaluation.pairs,
            labels=evaluation.labels,
            requests=int(stats.get("requests", 0)),
            elapsed_s=0.0,
        )
    finally:
        # Drains the shadow work, evaluates and persists once more, flushes the recorder.
        await runner.cleanup()
    outcome.elapsed_s = time.perf_counter() - started
    # Mirrored work the proxy shed under load (bounded queue): those requests have no pair.
    outcome.shadow_dropped = int(
        sum(
            sample.value
            for metric in registry.collect()
            if metric.name == "mirrorgate_shadow_dropped"
            for sample in metric.samples
            if sample.name == "mirrorgate_shadow_dropped_total"
        )
    )
    verdict = outcome.verdict.upper()
    say(
        f"  verdict: {verdict} after {outcome.requests:,} requests, {outcome.pairs:,} pairs, "
        f"{outcome.labels:,} labels ({outcome.elapsed_s:.1f} s; "
        f"{outcome.shadow_dropped:,} mirrored requests shed under load)"
    )
    say(f"  reason:  {outcome.reason}")
    return outcome


async def _drive_in_child(
    url: str,
    token: str,
    scenario: Scenario,
    *,
    mode: str,
    seed: int | None,
    live: dict[str, Any],
    final: Callable[[], bool],
) -> dict[str, Any]:
    """Send the scenario from a client process (proxy.demo.client) until the verdict."""
    import os

    env = dict(os.environ)
    root = _package_root()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["MIRRORGATE_DEMO_TOKEN"] = token
    cmd = [
        sys.executable,
        "-m",
        "proxy.demo.client",
        "--url",
        url,
        "--model",
        MODEL_NAME,
        "--mode",
        mode,
        "--prefix",
        scenario.key,
        "--concurrency",
        str(CONCURRENCY),
        "--requests",
        str(MAX_REQUESTS[mode]),
    ]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    child = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
    )
    assert child.stdin is not None and child.stdout is not None
    done: dict[str, Any] | None = None
    stopped = False
    try:
        while True:
            if not stopped and final():
                child.stdin.write(b"stop\n")
                await child.stdin.drain()
                stopped = True
            try:
                line = await asyncio.wait_for(child.stdout.readline(), 0.2)
            except TimeoutError:
                continue
            if not line:
                break
            message = json.loads(line)
            if "done" in message:
                done = message["done"]
            else:
                live["stats"] = message
        await child.wait()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    if done is None or child.returncode != 0:
        raise MirrorgateError(f"the demo's traffic client failed (exit {child.returncode})")
    live["stats"] = done
    return done


async def _warm_up(*backends: Any, runs: int = 30) -> None:
    """Run each model a few times before any traffic, as serving systems do (Triton's model
    warm-up): a cold session's first calls are slow for both models alike, and on a busy
    machine those outliers alone could tip the latency gate in the first few hundred
    pairs. Direct backend calls: nothing is mirrored or recorded."""
    from proxy.demo.assets import INPUT_NAME, load_pool

    pool = load_pool()
    rows = np.asarray(pool.features[:8], dtype=np.float32)
    for backend in backends:
        if backend is None:
            continue
        for i in range(runs):
            await backend.infer({INPUT_NAME: rows[: 1 + i % 8]})


def _failing_at_verdict(decisions: Sequence[Any]) -> list[str]:
    """The blocking cells that failed in the evidence of the abort decision."""
    for d in reversed(decisions):
        if d.action == "abort":
            return [
                e["name"] if e["slice"] == "*" else f"{e['name']}[{e['slice']}]"
                for e in d.evidence
                if e.get("blocking") and e.get("status") == "FAIL"
            ]
    return []


def _package_root() -> str:
    import proxy

    return str(Path(proxy.__file__).resolve().parents[1])


def _short_slice(cell: str) -> str:
    return cell.split("=", 1)[1] if "=" in cell else cell


def _progress_line(evaluation: Any, stats: Any, started: float) -> str:
    """One plain line: traffic counts, stage, and every blocking gate's state."""
    t = time.perf_counter() - started
    requests = int(stats.get("requests", 0)) if stats else 0
    head = f"  [{t:5.1f}s] requests {requests:>6,}"
    if evaluation is None:
        return head + "  (waiting for the first evaluation)"
    head += (
        f"  pairs {evaluation.pairs:>6,}  labels {evaluation.labels:>6,}  "
        f"stage {evaluation.stage} ({evaluation.canary_weight:.0%})  {evaluation.verdict}"
    )
    groups: dict[str, list[str]] = {}
    for g in evaluation.gates:
        if not g.blocking:
            continue
        word = {"PASS": "pass", "FAIL": "FAIL", "INCONCLUSIVE": "wait"}[g.status.value]
        if g.status.value != "PASS" and g.statistic is not None:
            word += f"({g.statistic:+.3f})"
        if g.slice == "*":
            cell = (
                "all" if any(x.name == g.name and x.slice != "*" for x in evaluation.gates) else ""
            )
        else:
            cell = _short_slice(g.slice)
        groups.setdefault(g.name, []).append(f"{cell}:{word}" if cell else word)
    gates = "  ".join(
        f"{name}[{' '.join(cells)}]" if len(cells) > 1 else f"{name}:{cells[0]}"
        for name, cells in groups.items()
    )
    return f"{head}\n           {gates}"


def _write_report(
    outcome: Outcome, config_path: Path, run_dir: Path, say: Callable[..., None]
) -> None:
    from proxy.report.build import write_pack
    from proxy.report.source import open_storage_source

    source = open_storage_source(str(config_path))
    try:
        doc = source.report_document(outcome.rollout_id)
        # HOOK(harvest): the pinned-failure harvester (built in parallel) stores the cases
        # it catches with this rollout's id; the count is read here and in the pack.
        outcome.harvested = sum(
            1 for c in source.store.list_pinned() if c.rollout_id == outcome.rollout_id
        )
    finally:
        source.close()
    pack = write_pack(doc, run_dir / "packs" / outcome.scenario.key)
    outcome.pack = pack.html_path
    outcome.digest = pack.digest
    say(f"  pinned failures harvested: {outcome.harvested}")
    say(f"  validation pack: {pack.html_path}")
    say(f"  report digest:   {pack.digest}")


def _summary(
    outcomes: list[Outcome], run_dir: Path, elapsed: float, say: Callable[..., None]
) -> int:
    say()
    say("== verdicts ==")
    for o in outcomes:
        mark = (
            "as expected"
            if o.as_expected
            else f"UNEXPECTED (expected {o.scenario.expected.upper()}"
            + (f" on {o.scenario.failing})" if o.scenario.failing else ")")
        )
        if o.verdict == "abort":
            what = "failing: " + (", ".join(o.failing) or "-")
        else:
            what = "stages: " + " -> ".join(o.stages_seen or [o.stage])
        say(f"  {o.scenario.candidate:<20} {o.verdict.upper():<8} {what}  [{mark}]")
        say(f"  {'':<20} {o.reason}")
    say()
    first = outcomes[0]
    config = run_dir / f"{first.scenario.key}.yaml"
    say(f"run directory: {run_dir}  ({elapsed:.1f} s in all)")
    say("next:")
    say(f"  open {first.pack}")
    say(f"  mirrorgate report --rollout {first.rollout_id} --config {config} --out DIR")
    say(
        f"  mirrorgate signoff --rollout {first.rollout_id} --config {config} "
        "--reviewer NAME --decision approve|reject"
    )
    return 0 if all(o.as_expected for o in outcomes) else 1
