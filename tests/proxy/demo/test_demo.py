"""``mirrorgate demo --fast``: the whole story through the real proxy, once per module.

Real parts only: the shipped ONNX models in-process behind the real aiohttp proxy on a
free loopback port, the traffic client in its own process sending requests with slice
headers and delayed labels over HTTP, SQLite in the run directory, the packs built from
the database. The demo's verdicts are the gates' verdicts on seeded traffic; what is
asserted is the story (which candidate, which slice), never a timing.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.cli.main import main
from proxy.report.document import load_document, report_digest, validate_document

pytestmark = pytest.mark.timeout(240)


@dataclass
class DemoRun:
    code: int
    output: str
    run_dir: Path

    def pack(self, key: str) -> Path:
        return self.run_dir / "packs" / key

    def doc(self, key: str) -> dict[str, Any]:
        return load_document(self.pack(key) / "report.json")

    def config(self, key: str) -> Path:
        return self.run_dir / f"{key}.yaml"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["demo", "--fast", "--out", str(run_dir)])
    return DemoRun(code, out.getvalue(), run_dir)


def _run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def test_regressed_is_aborted_on_mobile_and_good_is_promoted(demo: DemoRun) -> None:
    assert demo.code == 0, demo.output
    verdicts = demo.output.split("== verdicts ==")[1]
    regressed = next(line for line in verdicts.splitlines() if "candidate_regressed" in line)
    good = next(line for line in verdicts.splitlines() if "candidate_good" in line)
    assert "ABORT" in regressed and "metric.accuracy[platform=mobile]" in regressed
    assert "PROMOTE" in good and "shadow -> canary-5 -> canary-25" in good
    # Live progress: plain lines with counts and the blocking gates' states.
    assert demo.output.count("requests") > 4
    assert "metric.accuracy[" in demo.output and "stage shadow" in demo.output


def test_packs_validate_and_tell_the_story(demo: DemoRun) -> None:
    regressed, good = demo.doc("regressed"), demo.doc("good")
    for key in ("regressed", "good"):
        assert (demo.pack(key) / "report.html").is_file()
        validate_document(demo.doc(key))
    assert regressed["verdict"]["verdict"] == "abort"
    reason = regressed["verdict"]["reason"]
    assert "metric.accuracy[platform=mobile] FAIL" in reason and "statistic" in reason
    rows = {r["value"]: r for r in regressed["slice_table"]["rows"]}
    assert rows["mobile"]["status"] == "fail"
    assert rows["mobile"]["candidate"] < rows["mobile"]["champion"]
    assert rows["all"]["difference"] > 0  # better on aggregate: the trap
    assert good["verdict"]["verdict"] == "promote"
    assert good["rollout"]["stage"] == "promoted"
    stages = [t["stage_to"] for t in good["timeline"] if t["event"] == "stage"]
    assert stages == ["canary-5", "canary-25"]
    # Each blocking metric has its band over time, from the persisted evaluations.
    series = {(s["gate"], s["slice"]) for s in regressed["metric_series"]}
    assert ("metric.accuracy", "platform=mobile") in series
    mobile = next(s for s in regressed["metric_series"] if s["slice"] == "platform=mobile")
    assert mobile["points"][-1]["upper"] < mobile["threshold"]  # the band left the margin
    for doc in (regressed, good):
        assert doc["latency"]["champion"]["n"] == doc["counts"]["pairs"]
        assert doc["models"]["candidate"]["kind"] == "onnx"
        assert any(d["kind"] == "output" for d in doc["drift"])
    assert regressed["models"]["candidate"]["name"] == "candidate_regressed"


def test_report_from_the_database_is_the_demo_pack(demo: DemoRun, tmp_path: Path) -> None:
    rollout = demo.doc("good")["rollout"]["id"]
    code, out = _run(
        [
            "report",
            "--rollout",
            rollout,
            "--config",
            str(demo.config("good")),
            "--out",
            str(tmp_path / "pack"),
        ]
    )
    assert code == 0, out
    # Built only from recorded rows: rebuilding gives the same digest.
    assert report_digest(tmp_path / "pack" / "report.json") == report_digest(
        demo.pack("good") / "report.json"
    )
    assert main(["report", "--rollout", "r-nope", "--config", str(demo.config("good")),
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert not (tmp_path / "x" / "report.json").exists()


def test_signoff_on_the_database_and_a_digest_mismatch(demo: DemoRun, tmp_path: Path) -> None:
    doc = demo.doc("regressed")
    rollout, config = doc["rollout"]["id"], str(demo.config("regressed"))
    digest = report_digest(doc)
    base = ["signoff", "--rollout", rollout, "--config", config]
    code, _ = _run([*base, "--reviewer", "ana", "--decision", "reject", "--digest", digest])
    assert code == 0
    code, out = _run([*base, "--verify"])
    assert code == 0 and "ana reject" in out and "matches" in out
    # A reviewer who read an edited report is refused: the digest no longer matches.
    edited = json.loads(json.dumps(doc))
    edited["slice_table"]["rows"][1]["status"] = "pass"
    code, _ = _run([*base, "--reviewer", "bob", "--decision", "approve",
                    "--digest", report_digest(edited)])  # fmt: skip
    assert code == 1
    # The pack on disk, signed, then edited: verification reports the mismatch.
    pack = tmp_path / "pack"
    shutil.copytree(demo.pack("regressed"), pack)
    code, _ = _run(["signoff", "--rollout", rollout, "--pack", str(pack), "--reviewer", "cy",
                    "--decision", "reject"])  # fmt: skip
    assert code == 0
    assert _run(["signoff", "--rollout", rollout, "--pack", str(pack), "--verify"])[0] == 0
    text = (pack / "report.json").read_text().replace('"verdict":"abort"', '"verdict":"promote"')
    (pack / "report.json").write_text(text)
    code, out = _run(["signoff", "--rollout", rollout, "--pack", str(pack), "--verify"])
    assert code == 1 and "MISMATCH" in out


def test_demo_refuses_a_directory_that_holds_a_run(demo: DemoRun) -> None:
    assert main(["demo", "--fast", "--out", str(demo.run_dir)]) == 2
