"""A throwaway redis-server on 127.0.0.1 (Debian's redis-server binary), no persistence."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sagaz.errors import SagazError
from sagaz.testing.kafka import _die_with_parent, free_port


class RedisToolError(SagazError, RuntimeError):
    pass


class LocalRedis:
    def __init__(self, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="sagaz-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_in: float | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20) -> LocalRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisToolError("redis-server not found: apt-get install redis-server, or set "
                                 "SAGAZ_TEST_REDIS_URL")
        t0 = time.monotonic()
        with open(self.workdir / "log", "wb") as log:
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RedisToolError(f"redis-server exited: {(self.workdir / 'log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        self.started_in = time.monotonic() - t0
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RedisToolError(f"redis-server did not answer within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
