"""The console script: a light --help, help on every option, rollouts list, log options."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from proxy.cli.main import SUMMARIES, build_parser, command_modules, main
from storage.db import Database
from storage.entities import Decision
from storage.migrate import upgrade
from storage.store import Store
from tests.storage.factories import CANDIDATE, CHAMPION, make_record

ROOT = Path(__file__).resolve().parents[3]
HEAVY = ("scipy", "sqlalchemy", "numpy", "aiohttp", "alembic", "onnxruntime", "torch")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORGATE_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_top_level_help_imports_no_heavy_library():
    code = (
        "import json, sys\n"
        "from proxy.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True
    )
    assert "serve" in out.stdout and "rollouts" in out.stdout  # the help was printed
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_summary_table_matches_every_command_module():
    full = _subparsers(build_parser())
    helps = {a.dest: a.help for a in full._choices_actions}
    for module in command_modules():
        assert module in SUMMARIES, f"add proxy.cli.commands.{module} to proxy.cli.main.SUMMARIES"
        name, text = SUMMARIES[module]
        assert helps[name] == text


def _walk(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            yield path, action


def test_every_option_has_help_text():
    missing = [
        (path, action.option_strings or action.dest)
        for path, action in _walk(build_parser(), "mirrorgate")
        if not action.help
    ]
    assert missing == []


def _database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    db = Database(url)
    upgrade(db)
    store = Store(db)
    a = store.create_rollout(CHAMPION, CANDIDATE, rollout_id="r-a", now=1.0)
    store.write_pairs(a.id, [make_record(i, label=i % 2 if i < 3 else None) for i in range(5)])
    store.record_decision(
        a.id, Decision("abort", "engine", "engine", "accuracy fails", ts=2.0, from_stage="shadow")
    )
    store.create_rollout(CHAMPION, None, rollout_id="r-b", now=3.0)
    db.dispose()
    return url


def test_rollouts_list_shows_counts_and_last_verdict(tmp_path, capsys):
    url = _database(tmp_path)
    assert main(["rollouts", "list", "--url", url, "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["r-a"]["pairs"] == 5 and rows["r-a"]["labels"] == 3
    assert rows["r-a"]["verdict"] == "abort"
    assert rows["r-a"]["candidate"] == "candidate" and rows["r-a"]["revision"] == "sha256:bbb"
    assert rows["r-b"]["pairs"] == 0 and rows["r-b"]["verdict"] is None
    assert main(["rollouts", "list", "--url", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "id", "champion", "candidate", "revision", "stage", "status", "verdict", "pairs", "labels"
    ]  # fmt: skip
    assert lines[1].split()[0] == "r-b"  # newest first
    assert lines[2].split()[-3:] == ["abort", "5", "3"]


def test_alembic_info_off_unless_verbose_and_json_logs(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.sqlite'}"
    quiet = subprocess.run(
        [sys.executable, "-m", "proxy", "db", "upgrade", "--url", url],
        capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert quiet.returncode == 0, quiet.stderr
    assert "Running upgrade" not in quiet.stderr
    url = f"sqlite:///{tmp_path / 'b.sqlite'}"
    loud = subprocess.run(
        [sys.executable, "-m", "proxy", "-v", "--log-format", "json", "db", "upgrade",
         "--url", url],
        capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert loud.returncode == 0, loud.stderr
    lines = [json.loads(x) for x in loud.stderr.splitlines() if x.startswith("{")]
    assert any(
        "Running upgrade" in x["message"] and x["logger"].startswith("alembic") for x in lines
    )
