"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb + pg_ctl in a temp dir.

Binaries come from ``MIRRORGATE_PG_BIN``, PATH or /usr/lib/postgresql/<version>/bin
(Debian's layout; the newest version wins). PostgreSQL refuses to run as root, so as
root the cluster runs as the ``postgres`` user (created as a system user when missing).
The server listens on 127.0.0.1 only, on a free port, with trust authentication; its
socket lives in the cluster's own folder.

    with PostgresServer() as pg:
        url = pg.create_database("t1")   # postgresql+psycopg://postgres@127.0.0.1:PORT/t1
        ...
        pg.stop(); pg.start()            # same port, same data: "the database went down"
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

SERVICE_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here, or the cluster could not start (message says why)."""


def find_bin_dir() -> Path | None:
    """``MIRRORGATE_PG_BIN`` (a folder holding pg_ctl) wins; then PATH; then Debian's."""
    override = os.environ.get("MIRRORGATE_PG_BIN")
    if override is not None:
        return Path(override) if (Path(override) / "pg_ctl").exists() else None
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in p.split("/")[4].split(".")],
    )
    return Path(candidates[-1]).parent if candidates else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        pass
    try:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SERVICE_USER,
            ],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise PostgresUnavailable(f"cannot create the {SERVICE_USER!r} user: {exc}") from exc
    return pwd.getpwnam(SERVICE_USER)


class PostgresServer:
    def __init__(self, *, fast: bool = True, settings: dict[str, str] | None = None) -> None:
        """``fast``: fsync off (a test cluster need not survive a power cut).
        ``settings``: extra ``-c name=value`` server options."""
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise PostgresUnavailable(
                "no PostgreSQL binaries (pg_ctl) in PATH or /usr/lib/postgresql/*/bin; "
                "install them with `bash scripts/ensure_services.sh` (Debian: postgresql)"
            )
        self.bin_dir = bin_dir
        self.fast = fast
        self.settings = dict(settings or {})
        self.port = 0
        self.root: Path | None = None
        self._run_as: dict[str, Any] = {}

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> PostgresServer:
        self.init()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def init(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mirrorgate-pg-"))
        if os.geteuid() == 0:
            user = _ensure_user()
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        os.chmod(self.root, 0o700)
        self._pg(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )

    @property
    def data(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        assert self.root is not None
        return self.root / "server.log"

    def start(self) -> None:
        """Start (or restart after ``stop``) on the same port when it is still free."""
        assert self.root is not None
        for _attempt in range(5):
            if not self.port:
                self.port = free_port()
            options = [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.root}",
                "-c max_connections=100",
                "-c shared_buffers=32MB",
            ]
            if self.fast:
                options += ["-c fsync=off", "-c full_page_writes=off"]
            options += [f"-c {k}={v}" for k, v in self.settings.items()]
            try:
                self._pg(
                    "pg_ctl",
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log_file),
                    "-o",
                    " ".join(options),
                    "-w",
                    "-t",
                    "60",
                    "start",
                )
                return
            except PostgresUnavailable:
                if not self._port_taken():
                    raise
                self.port = 0  # somebody took the port meanwhile: pick another
        raise PostgresUnavailable("could not find a free port for PostgreSQL")

    def stop(self, mode: str = "fast") -> None:
        if self.root is not None and (self.data / "postmaster.pid").exists():
            self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        if self.root is None:
            return
        with contextlib.suppress(PostgresUnavailable):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    # -- use --------------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def execute(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            dbname="postgres",
            autocommit=True,
            connect_timeout=10,
        ) as conn:
            conn.execute(sql.encode())

    # -- internals --------------------------------------------------------------------

    def _port_taken(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def _pg(self, program: str, *args: str) -> None:
        cmd = [str(self.bin_dir / program), *args]
        try:
            subprocess.run(
                cmd,
                check=True,
                capture_output=True,
                text=True,
                timeout=120,
                cwd=str(self.root),
                env={**os.environ, "LC_ALL": "C"},
                **self._run_as,
            )
        except subprocess.CalledProcessError as exc:
            tail = ""
            if self.root is not None and self.log_file.exists():
                tail = self.log_file.read_text(errors="replace")[-2000:]
            raise PostgresUnavailable(
                f"{program} failed ({exc.returncode}): {exc.stderr.strip()[-2000:]}\n{tail}"
            ) from exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresUnavailable(f"{program} failed: {exc}") from exc


def wait_until_down(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.05)
