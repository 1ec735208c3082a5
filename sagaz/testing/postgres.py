"""A throwaway PostgreSQL server from the Debian binaries, for tests and benchmarks.

PostgreSQL refuses to run as root, so when started by root the server runs as the
``postgres`` system user (created by the Debian package). Listens on 127.0.0.1 and a
socket directory of its own; trust authentication; fsync off (a throwaway server).

    with LocalPostgres() as pg:
        pg.url   # postgresql://postgres@127.0.0.1:PORT/postgres
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from sagaz.errors import SagazError
from sagaz.testing.kafka import free_port


class PostgresToolError(SagazError, RuntimeError):
    pass


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PostgresToolError("PostgreSQL server binaries not found (initdb); install them with "
                            "apt-get install postgresql, or set SAGAZ_TEST_POSTGRES_URL")


class LocalPostgres:
    def __init__(self, *, port: int | None = None, durable: bool = False) -> None:
        """``durable``: fsync and synchronous commits on (a crash loses nothing committed;
        for crash tests). Off by default: faster, and a test server is thrown away."""
        self.port = port or free_port()
        self.durable = durable
        self.workdir = Path(tempfile.mkdtemp(prefix="sagaz-pg-"))
        self.datadir = self.workdir / "data"
        self.bindir = _bindir()
        self.user: str | None = None
        self.started_in: float | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True)

    def start(self) -> LocalPostgres:
        t0 = time.monotonic()
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresToolError("running as root needs the 'postgres' system user "
                                        "(apt-get install postgresql creates it)") from None
            self.user = "postgres"
            shutil.chown(self.workdir, "postgres", "postgres")
        out = self._run("initdb", "-D", str(self.datadir), "-U", "postgres", "-A", "trust",
                        "-E", "UTF8", "--no-sync")
        if out.returncode != 0:
            raise PostgresToolError(f"initdb failed: {out.stdout}{out.stderr}")
        self._pg_start()
        self.started_in = time.monotonic() - t0
        return self

    def _pg_start(self) -> None:
        sync = "on" if self.durable else "off"
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                f"-c unix_socket_directories={self.workdir} -c fsync={sync} "
                f"-c synchronous_commit={sync} -c full_page_writes={sync} "
                f"-c max_connections=100")
        out = self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.workdir / "log"),
                        "-o", opts, "-w", "-t", "60", "start")
        if out.returncode != 0:
            log = (self.workdir / "log").read_text() if (self.workdir / "log").exists() else ""
            raise PostgresToolError(f"pg_ctl start failed: {out.stdout}{out.stderr}\n{log}")

    def halt(self) -> None:
        """Stop the server at once (as a crash would: -m immediate), keeping its data."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")

    def resume(self) -> None:
        """Start a halted server again on its port and data."""
        self._pg_start()

    def stop(self) -> None:
        if self.datadir.exists():
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
