"""A throwaway RabbitMQ node on 127.0.0.1, from Debian's rabbitmq-server, no Docker.

Runs /usr/lib/rabbitmq/bin/rabbitmq-server directly (the /usr/sbin wrapper switches to the
rabbitmq user) with a node name, ports, data directory and Erlang cookie of its own, and
binds both the AMQP and the Erlang distribution listeners (and epmd) to loopback. The Erlang
VM starts epmd as a daemon outside the node's process group, so the node gets an epmd of
its own on a private port, killed when the node stops.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sagaz.errors import SagazError
from sagaz.testing.kafka import _die_with_parent, free_port

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


class RabbitMQToolError(SagazError, RuntimeError):
    pass


class LocalRabbitMQ:
    def __init__(self) -> None:
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="sagaz-rabbitmq-"))
        self.node = f"sagaz{self.port}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_in: float | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self, timeout: float = 60) -> LocalRabbitMQ:
        if not SERVER.exists():
            raise RabbitMQToolError("rabbitmq-server not found: apt-get install rabbitmq-server, "
                                    "or set SAGAZ_TEST_RABBITMQ_URL")
        t0 = time.monotonic()
        w = self.workdir
        (w / "enabled_plugins").write_text("[].\n")
        env = {**os.environ, "HOME": str(w), "RABBITMQ_NODENAME": self.node,
               "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(self.port),
               "RABBITMQ_DIST_PORT": str(self.dist_port),
               "RABBITMQ_MNESIA_BASE": str(w / "mnesia"), "RABBITMQ_LOG_BASE": str(w / "log"),
               "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
               "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq"), "ERL_EPMD_ADDRESS": "127.0.0.1",
               "ERL_EPMD_PORT": str(self.epmd_port),
               "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface "
                                                      "{127,0,0,1}"}
        with open(w / "out.log", "wb") as out:
            self.proc = subprocess.Popen([str(SERVER)], cwd=w, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent, start_new_session=True)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RabbitMQToolError(f"rabbitmq-server exited:\n{self.tail()}")
            if self._answers():
                self.started_in = time.monotonic() - t0
                return self
            time.sleep(0.2)
        self.stop()
        raise RabbitMQToolError(f"RabbitMQ did not answer within {timeout}s:\n{self.tail()}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), 0.5) as s:
                s.sendall(b"AMQP\x00\x00\x09\x01")
                return s.recv(1) == b"\x01"  # a method frame: connection.start
        except OSError:
            return False

    def tail(self) -> str:
        p = self.workdir / "out.log"
        return "".join(p.read_text(errors="replace").splitlines(True)[-20:]) if p.exists() else ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the script and the Erlang VM it starts
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        epmd = shutil.which("epmd")
        if epmd is not None:  # ours alone: it listens on our private port
            subprocess.run([epmd, "-kill"], env={**os.environ,
                                                 "ERL_EPMD_PORT": str(self.epmd_port)},
                           capture_output=True, timeout=10, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalRabbitMQ:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
