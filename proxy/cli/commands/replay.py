"""``mirrorgate replay``: the online gates and decision engine over a recorded file.

Exit codes: 0 promote, continue or hold; 1 abort; 2 bad input (the message names the file
and line) or a bad configuration (the message names the key).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from gates.join import LabelJoin
from gates.replay import NoPairs, OutOfOrder, ReplayResult, replay, replay_stream
from gates.result import GateResult, Status, fmt
from gates.settings import GatesSettings, RolloutSettings, Task
from proxy.cli.progress import add_quiet, track
from proxy.core.config import (
    FeaturesSettings,
    MirrorSettings,
    OutputSettings,
    ServerSettings,
    SlicesSettings,
    StorageSettings,
    load_config,
)
from proxy.core.errors import ConfigError
from storage.files import read_labels, read_pair_blocks, read_pairs


class _GatesOnlyConfig(BaseModel):
    """A configuration file without ``models`` (replay needs no models): same sections."""

    model_config = ConfigDict(extra="forbid")
    server: ServerSettings = ServerSettings()
    mirror: MirrorSettings = MirrorSettings()
    slices: SlicesSettings = SlicesSettings()
    features: FeaturesSettings = FeaturesSettings()
    output: OutputSettings = OutputSettings()
    storage: StorageSettings = StorageSettings()
    gates: GatesSettings = GatesSettings()
    rollout: RolloutSettings = RolloutSettings()


class ReplayConfig(BaseModel):
    gates: GatesSettings
    rollout: RolloutSettings
    task: Task
    slice_keys: list[str] | None
    label_window_s: float


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "replay",
        help="run the gates and decision engine over a recorded paired-record file",
        description=(
            "Replays a paired-record JSONL file (and optionally a label file) in timestamp "
            "order through the same gates and decision engine the proxy runs, and prints "
            "the verdict, the pair/label index where it was reached and every gate's "
            "evidence. Exit 0 promote/continue/hold, 1 abort, 2 bad input."
        ),
    )
    p.add_argument("--config", type=Path, help="mirrorgate YAML (gates/rollout sections)")
    p.add_argument("--pairs", type=Path, required=True, help="paired-record JSONL file")
    p.add_argument("--labels", type=Path, help='label JSONL file ({"id", "label", "ts"?})')
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--read-all",
        action="store_true",
        help=(
            "read (and check) the whole file even after the decision: pairs_read is then "
            "the file's count; by default reading stops at the decision"
        ),
    )
    add_quiet(p)
    p.set_defaults(func=run)


def load_replay_config(path: Path | None) -> ReplayConfig:
    if path is None:
        return ReplayConfig(
            gates=GatesSettings(),
            rollout=RolloutSettings(),
            task="auto",
            slice_keys=None,
            label_window_s=StorageSettings().label_window_s,
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: top level must be a mapping")
    if "models" in raw:
        full = load_config(path)
        gates, rollout, output = full.gates, full.rollout, full.output
        slices, storage = full.slices, full.storage
    else:
        from proxy.core.settings_load import load_settings

        # Same sources as the full config; the models section is not replay's concern.
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MIRRORGATE_MODELS")}
        part = load_settings(_GatesOnlyConfig, path, env=env)
        gates, rollout, output = part.gates, part.rollout, part.output
        slices, storage = part.slices, part.storage
    configured = [*slices.headers, *slices.parameters, *slices.rules]
    task: Task = gates.task if gates.task != "auto" else output.task
    return ReplayConfig(
        gates=gates,
        rollout=rollout,
        task=task,
        slice_keys=configured or None,
        label_window_s=storage.label_window_s,
    )


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_replay_config(args.config)
        labels = list(read_labels(args.labels)) if args.labels else []
        reference = None
        ref_cfg = cfg.gates.drift.input
        if ref_cfg.enabled and ref_cfg.reference == "file" and ref_cfg.reference_path:
            ref_path = Path(ref_cfg.reference_path)
            if args.config is not None and not ref_path.is_absolute():
                ref_path = args.config.resolve().parent / ref_path
            reference = list(read_pairs(ref_path))
    except ValueError as exc:
        print(f"mirrorgate: error: {exc}", file=sys.stderr)
        return 2
    # Without configured slice keys, keys and values get their cells (and their share of
    # the error budget) as they appear, exactly as online: nothing is read ahead of the
    # look that uses it (docs/gates.md, "Replay").
    gates = cfg.gates if cfg.slice_keys is None else cfg.gates.with_slice_keys(cfg.slice_keys)
    common: dict[str, Any] = {
        "gates": gates,
        "plan": cfg.rollout,
        "task": cfg.task,
        "reference": reference,
    }
    result: ReplayResult | None = None
    try:
        if str(args.pairs) != "-":
            # The stream: decide while reading, columns straight from the lines, stop at
            # the decision. A file that goes back in time is read again whole and sorted
            # (a pipe cannot be read twice: stdin always takes the whole-file path).
            try:
                result = replay_stream(
                    track(read_pair_blocks(args.pairs), args, desc="replay", unit="block"),
                    labels,
                    join=LabelJoin(label_window_s=cfg.label_window_s),
                    read_all=getattr(args, "read_all", False),
                    **common,
                )
            except OutOfOrder:
                result = None
            except NoPairs:
                raise ValueError(f"{args.pairs}: no paired records") from None
        if result is None:
            records = list(track(read_pairs(args.pairs), args, desc="read pairs", unit="pair"))
            if not records:
                raise ValueError(f"{args.pairs}: no paired records")
            result = replay(
                records, labels, join=LabelJoin(label_window_s=cfg.label_window_s), **common
            )
    except ValueError as exc:
        print(f"mirrorgate: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(result.to_dict(), sys.stdout, allow_nan=False, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(result))
    return 1 if result.evaluation.verdict == "abort" else 0


def _row(g: GateResult) -> str:
    status = "WARNING" if g.warning else g.status.value
    if g.exempt:
        status = "(optional)"  # a small slice: may FAIL, not required to PASS
    return (
        f"  {status:<13}{g.label:<46}{fmt(g.statistic):>11}{fmt(g.threshold):>10}"
        f"{g.n:>9}  {g.method.name}"
    )


def render(result: ReplayResult) -> str:
    ev = result.evaluation
    out = [f"verdict: {ev.verdict}"]
    if ev.decided_at is not None:
        out.append(f"decided at: pair {ev.decided_at['pairs']}, label {ev.decided_at['labels']}")
    else:
        out.append("decided at: - (no decision yet)")
    out.append(f"reason: {ev.reason}")
    out.append(
        f"stage: {ev.stage} ({ev.stage_index + 1} of {len(ev.stages)}), "
        f"canary weight {ev.canary_weight:g}"
    )
    out.append(
        f"replay: {result.pairs_read} pairs and {result.labels_read} labels read, "
        f"{result.pairs_fed} pairs fed, {result.unmatched_labels} labels unmatched"
    )
    out.append("")
    out.append(f"  {'STATUS':<13}{'GATE[SLICE]':<46}{'STATISTIC':>11}{'LIMIT':>10}{'N':>9}  METHOD")
    order = {Status.FAIL: 0, Status.INCONCLUSIVE: 1, Status.PASS: 2}
    gates = sorted(ev.gates, key=lambda g: (not g.blocking, order[g.status], g.name, g.slice))
    for g in gates:
        out.append(_row(g))
    out.append("")
    out.append("evidence:")
    for g in gates:
        lower, upper = g.interval()
        cs = f" [anytime CS {fmt(lower)}, {fmt(upper)}]" if lower is not None else ""
        out.append(f"  {g.label}: {g.reason}{cs}")
    out.append("")
    out.append("decisions:")
    if not result.decisions:
        out.append("  (none)")
    for d in result.decisions:
        out.append(
            f"  {d.action} {d.from_stage}->{d.to_stage} at pair {d.pairs}, label {d.labels} "
            f"by {d.who}"
        )
    return "\n".join(out) + "\n"
