"""Progress bars appear on a terminal and nowhere else (pipes, --quiet, -q)."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

from tests.proxy.cli.test_cli import _database, _env


def _run_with_stderr_on_a_tty(args: list[str]) -> tuple[int, str]:
    master, slave = pty.openpty()
    # A real terminal has a size; a fresh pty reports 0x0 and tqdm draws nothing there.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args],
            stdout=subprocess.DEVNULL,
            stderr=slave,
            env=_env(),
        )
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        return proc.wait(timeout=120), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)


def test_export_draws_a_bar_on_a_terminal_only(tmp_path: Path):
    url = _database(tmp_path)
    base = ["export", "pairs", "--url", url, "--rollout", "r-a"]
    rc, tty = _run_with_stderr_on_a_tty([*base, "--out", str(tmp_path / "a.jsonl")])
    assert rc == 0
    assert "export:" in tty and "/5 " in tty and "pair" in tty, tty
    rc, quiet = _run_with_stderr_on_a_tty([*base, "--out", str(tmp_path / "b.jsonl"), "--quiet"])
    assert rc == 0 and "/5 " not in quiet and "exported 5 pairs" in quiet
    rc, q = _run_with_stderr_on_a_tty(["-q", *base, "--out", str(tmp_path / "c.jsonl")])
    assert rc == 0 and "/5 " not in q
    piped = subprocess.run(
        [sys.executable, "-m", "proxy", *base, "--out", str(tmp_path / "d.jsonl")],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert piped.returncode == 0 and "/5 " not in piped.stderr
    assert "exported 5 pairs" in piped.stderr
