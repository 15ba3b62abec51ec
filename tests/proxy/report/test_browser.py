"""Browser check: headless Chromium opens the pack from disk and the plots render.

Needs Debian's ``chromium`` (``scripts/ensure_services.sh`` installs it). Without it the
test is skipped with a message, unless MIRRORGATE_REQUIRE_SERVICES=1 (CI), where it fails.
Network is switched off for the browser (every host name resolves to nothing), so the
page renders only if it is truly self-contained.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy.report import SignOff, report_digest, write_pack
from proxy.report.svg import BAND_FILL

pytestmark = pytest.mark.browser

WIDTH, HEIGHT = 1280, 4600
ABORT_RED = (0xB4, 0x23, 0x18)  # .verdict-abort background
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-color-profile=srgb",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]


def _chromium() -> str:
    for name in (os.environ.get("MIRRORGATE_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    message = (
        "headless Chromium not found: install Debian's chromium package "
        "(run 'bash scripts/ensure_services.sh' as root) or set MIRRORGATE_CHROMIUM"
    )
    if os.environ.get("MIRRORGATE_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _run_chromium(args: list[str], tmp: Path) -> str:
    """Run Chromium in its own process group; on a hang, kill that group (ours) only."""
    env = {**os.environ, "HOME": str(tmp)}
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("chromium did not finish within 120 s")
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {err[-2000:]}"
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import json

    chromium = _chromium()
    tmp = tmp_path_factory.mktemp("browser")
    doc = json.loads((Path(__file__).with_name("sample_report.json")).read_text())
    digest = report_digest(doc)
    doc["signoffs"] = [
        SignOff("ann", "reject", "android slice regressed", 1_764_054_000.0, digest).to_dict(),
        SignOff("bob", "approve", "signed an older build", 1_764_053_000.0, "0" * 64).to_dict(),
    ]
    pack = write_pack(doc, tmp / "pack")
    url = pack.html_path.resolve().as_uri()
    shot = tmp / "shot.png"
    common = [chromium, *CHROMIUM_FLAGS, f"--window-size={WIDTH},{HEIGHT}"]
    _run_chromium(
        [*common, f"--user-data-dir={tmp / 'profile-shot'}", f"--screenshot={shot}", url], tmp
    )
    dom = _run_chromium([*common, f"--user-data-dir={tmp / 'profile-dom'}", "--dump-dom", url], tmp)
    return {"doc": doc, "shot": shot, "dom": dom}


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int32)


def _near(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 3) -> int:
    return int((np.abs(pixels - np.asarray(rgb, dtype=np.int32)) <= tol).all(axis=2).sum())


def _hex(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def test_screenshot_shows_the_plots(rendered: dict[str, Any]) -> None:
    pixels = _pixels(rendered["shot"])
    assert pixels.shape == (HEIGHT, WIDTH, 3)
    non_white = (pixels < 245).any(axis=2).mean()
    assert non_white > 0.05, f"page looks blank: {non_white:.1%} non-white"
    packed = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    colours = len(np.unique(packed))
    assert colours > 300, f"only {colours} distinct colours: plots did not render"
    # The verdict banner and the confidence bands were painted in their exact colours.
    assert _near(pixels, ABORT_RED) > 20_000
    band_pixels = _near(pixels, _hex(BAND_FILL))
    assert band_pixels > 20_000, f"confidence bands cover only {band_pixels} pixels"


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.classes: list[tuple[str, str]] = []
        self.stack: list[str] = []
        self.text: dict[str, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        cls = dict(attrs).get("class") or ""
        self.classes.append((tag, cls))
        self.stack.append(cls)

    def handle_endtag(self, tag: str) -> None:
        if self.stack:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.stack:
            self.text.setdefault(self.stack[-1], []).append(data)

    def count(self, tag: str, cls: str) -> int:
        return sum(1 for t, c in self.classes if t == tag and cls in c.split())


def test_dom_has_the_plot_elements_and_verdict(rendered: dict[str, Any]) -> None:
    dom = _Dom()
    dom.feed(rendered["dom"])
    doc = rendered["doc"]
    # The browser parsed the inline SVG into elements (not text): one chart per series...
    assert dom.count("svg", "plot-band") == len(doc["metric_series"])
    assert dom.count("polygon", "band") == len(doc["metric_series"])
    assert dom.count("polyline", "estimate") == len(doc["metric_series"])
    # ...the per-slice intervals, the PSI bars, and both latency histograms.
    assert dom.count("svg", "plot-interval") == 1
    assert dom.count("line", "interval") == len(doc["slice_table"]["rows"])
    assert dom.count("svg", "plot-bar") == 1
    assert dom.count("rect", "bar-champion") > 10 and dom.count("rect", "bar-candidate") > 10
    assert "".join(dom.text["verdict-word"]).strip() == "ABORT"
    # Sign-offs: one matches, the stale one is flagged.
    assert dom.count("span", "match") == 1
    assert dom.count("span", "mismatch") == 1
    assert "MISMATCH" in "".join(dom.text["mismatch"])
