"""``mirrorgate report`` and ``mirrorgate signoff``: results, files and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.cli.main import main
from proxy.report import load_document, report_digest, validate_document
from proxy.report import source as sources

ROLLOUT = "fraud-v7-2025-11-25"


@pytest.fixture
def pack(sample_path: Path, tmp_path: Path) -> Path:
    out = tmp_path / "pack"
    assert main(["report", "--from-json", str(sample_path), "--out", str(out)]) == 0
    return out


def _signoff(pack: Path, *extra: str, reviewer: str = "ann") -> int:
    return main(
        [
            "signoff",
            "--rollout",
            ROLLOUT,
            "--pack",
            str(pack),
            "--reviewer",
            reviewer,
            "--decision",
            "reject",
            *extra,
        ]
    )


def test_report_from_json_writes_a_valid_pack(
    sample_path: Path,
    tmp_path: Path,
    sample_doc: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    pack = tmp_path / "new" / "pack"
    assert main(["report", "--from-json", str(sample_path), "--out", str(pack)]) == 0
    out = capsys.readouterr().out
    doc = load_document(pack / "report.json")
    validate_document(doc)
    assert doc == sample_doc
    assert (pack / "report.html").read_text().count('class="plot plot-band"') == 2
    assert f"digest:    {report_digest(sample_doc)}" in out
    assert "verdict:   ABORT" in out


def test_signoff_records_and_shows_on_the_page(
    pack: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digest = report_digest(pack / "report.json")
    assert _signoff(pack, "--note", "android <regression>") == 0
    assert "ann rejects" in capsys.readouterr().out
    line = json.loads((pack / "signoffs.jsonl").read_text())
    assert line["rollout"] == ROLLOUT and line["reviewer"] == "ann"
    assert line["decision"] == "reject" and line["digest"] == digest
    assert line["note"] == "android <regression>"
    page = (pack / "report.html").read_text()
    assert "matches this report" in page and "android &lt;regression&gt;" in page
    # The re-rendered pack carries the sign-off and keeps its digest.
    doc = load_document(pack / "report.json")
    assert [s["reviewer"] for s in doc["signoffs"]] == ["ann"]
    assert report_digest(doc) == digest
    assert main(["signoff", "--rollout", ROLLOUT, "--pack", str(pack), "--verify"]) == 0
    assert "ann reject" in capsys.readouterr().out


def test_edited_report_fails_verification_and_is_marked(
    pack: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _signoff(pack) == 0
    doc = load_document(pack / "report.json")
    doc["verdict"]["verdict"] = "promote"  # tampered after sign-off
    (pack / "report.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["signoff", "--rollout", ROLLOUT, "--pack", str(pack), "--verify"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    # Re-rendering the edited document shows the mismatch on the page.
    assert main(["report", "--from-json", str(pack / "report.json"), "--out", str(pack)]) == 0
    assert "1 no longer match" in capsys.readouterr().out
    assert "MISMATCH: the report changed after this sign-off" in (pack / "report.html").read_text()


def test_signoff_refuses_when_the_reviewed_digest_is_stale(
    pack: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _signoff(pack, "--digest", "f" * 64) == 1
    assert "has changed since you reviewed it" in capsys.readouterr().err
    assert not (pack / "signoffs.jsonl").exists()
    assert _signoff(pack, "--digest", report_digest(pack / "report.json").upper()) == 0


def test_verify_without_signoffs_fails(pack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["signoff", "--rollout", ROLLOUT, "--pack", str(pack), "--verify"]) == 1
    assert "no sign-offs recorded" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["signoff", "--rollout", "other", "--reviewer", "a", "--decision", "approve"],
        ["signoff", "--rollout", ROLLOUT, "--reviewer", " ", "--decision", "approve"],
        ["signoff", "--rollout", ROLLOUT, "--reviewer", "a"],
        ["signoff", "--rollout", ROLLOUT, "--verify", "--reviewer", "a"],
    ],
)
def test_signoff_bad_input_exits_2(
    pack: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--pack", str(pack)]) == 2
    assert "mirrorgate: error:" in capsys.readouterr().err
    assert not (pack / "signoffs.jsonl").exists()


def test_signoff_bad_decision_and_missing_pack_exit_2(tmp_path: Path, pack: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(
            [
                "signoff",
                "--rollout",
                ROLLOUT,
                "--pack",
                str(pack),
                "--reviewer",
                "a",
                "--decision",
                "maybe",
            ]
        )
    assert info.value.code == 2
    assert (
        main(
            [
                "signoff",
                "--rollout",
                ROLLOUT,
                "--pack",
                str(tmp_path / "nowhere"),
                "--reviewer",
                "a",
                "--decision",
                "approve",
            ]
        )
        == 2
    )


def test_report_bad_input_exits_2_and_writes_nothing(
    tmp_path: Path, sample_doc: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["report", "--from-json", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    sample_doc["gates"][0]["status"] = "green"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(sample_doc))
    assert main(["report", "--from-json", str(bad), "--out", str(out)]) == 2
    assert "$.gates[0].status" in capsys.readouterr().err
    assert not out.exists()
    good = tmp_path / "good.json"
    sample_doc["gates"][0]["status"] = "fail"
    good.write_text(json.dumps(sample_doc))
    assert main(["report", "--from-json", str(good), "--rollout", "other", "--out", str(out)]) == 2
    assert main(["report", "--out", str(out)]) == 2
    assert not out.exists()


def test_report_from_storage_without_a_database_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No config: the default store (./mirrorgate.sqlite) is read, never created.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MIRRORGATE_STORAGE__URL", raising=False)
    assert main(["report", "--rollout", ROLLOUT, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no database" in err and "--config" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "mirrorgate.sqlite").exists()


def test_storage_seam_drives_both_commands(
    pack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commands only need a ReportSource; PackSource stands in for storage here."""
    opened: list[str | None] = []

    def open_source(config: str | None) -> sources.ReportSource:
        opened.append(config)
        return sources.PackSource(pack)

    monkeypatch.setattr(sources, "open_storage_source", open_source)
    assert isinstance(sources.PackSource(pack), sources.ReportSource)
    assert (
        main(
            [
                "signoff",
                "--rollout",
                ROLLOUT,
                "--config",
                "cfg.yaml",
                "--reviewer",
                "bo",
                "--decision",
                "approve",
            ]
        )
        == 0
    )
    out = tmp_path / "from-storage"
    assert main(["report", "--rollout", ROLLOUT, "--out", str(out)]) == 0
    assert opened == ["cfg.yaml", None]
    doc = load_document(out / "report.json")
    assert [s["reviewer"] for s in doc["signoffs"]] == ["bo"]
    assert "matches this report" in (out / "report.html").read_text()


def test_console_exit_codes(pack: Path, tmp_path: Path) -> None:
    """The real process: 0 on success, 1 on a mismatch, 2 on bad input."""

    def run(*argv: str) -> int:
        return subprocess.run(
            [sys.executable, "-m", "proxy", *argv], capture_output=True, timeout=120
        ).returncode

    assert (
        run(
            "signoff",
            "--rollout",
            ROLLOUT,
            "--pack",
            str(pack),
            "--reviewer",
            "a",
            "--decision",
            "approve",
        )
        == 0
    )
    (pack / "report.json").write_text(
        (pack / "report.json").read_text().replace('"labels":5000', '"labels":5001', 1)
    )
    assert run("signoff", "--rollout", ROLLOUT, "--pack", str(pack), "--verify") == 1
    assert run("report", "--from-json", str(tmp_path / "nope.json"), "--out", str(pack)) == 2
