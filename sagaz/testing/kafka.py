"""A throwaway single-node Apache Kafka broker, without Docker.

Apache Kafka's broker is published on Maven Central (``org.apache.kafka:kafka_2.13``).
``resolve()`` copies it and its runtime dependencies into a cache directory outside the
repository, once, using the small pom shipped beside this module. ``LocalKafka`` formats
KRaft storage in a fresh directory, starts ``kafka.Kafka`` as broker+controller on free
loopback ports with a small heap, waits until the broker answers a metadata request and
stops it cleanly. The JVM dies with the Python process that started it (PR_SET_PDEATHSIG on
Linux, plus an atexit hook), so a crashed test session leaves no orphan broker behind.

Secured listeners, for the tests of secured clusters: ``LocalKafka(secure=("SASL_PLAINTEXT",
"SSL", "SASL_SSL"), users={"alice": "..."})`` adds one listener per protocol beside the
PLAINTEXT one (which stays the inter-broker listener and the readiness probe's door, so the
broker needs no credentials for itself). SASL listeners accept PLAIN, SCRAM-SHA-256 and
SCRAM-SHA-512; the SCRAM users are written into the KRaft metadata at format time
(``StorageTool format --add-scram``). SSL listeners use a throwaway CA and broker certificate
made with the ``openssl`` command in the work directory (PEM key stores, Kafka >= 2.7); the
SSL listener requires a client certificate (``client_cert``/``client_key``, signed by the
same CA), the SASL_SSL listener authenticates by SASL only. ``listener(protocol)`` gives the
host:port of one listener; ``ca_file`` the CA that signed the broker's certificate.

Command line::

    python -m sagaz.testing.kafka resolve          # fetch the jars into the cache
    python -m sagaz.testing.kafka start [--port N] # run a broker until Ctrl-C
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import concurrent.futures
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

from sagaz.errors import SagazError

KAFKA_VERSION = "3.9.1"
_POM = "kafka-pom.xml"


class KafkaToolError(SagazError, RuntimeError):
    """The local broker could not be resolved or started; the message says what to do."""


def cache_dir() -> Path:
    base = os.environ.get("SAGAZ_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sagaz"
    )
    return Path(base) / f"kafka-{KAFKA_VERSION}"


def _require(tool: str, why: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise KafkaToolError(
            f"'{tool}' was not found on PATH; it is needed {why}. Install it "
            f"(Debian: apt-get install openjdk-17-jre-headless maven), or point the tests at an "
            f"existing broker with KAFKA_BOOTSTRAP_SERVERS=host:port."
        )
    return path


def resolve(*, quiet: bool = True) -> Path:
    """Return the directory holding the broker's jars, resolving them from Maven once."""
    libs = cache_dir() / "libs"
    marker = cache_dir() / "resolved.ok"
    if marker.exists() and any(libs.glob("kafka_2.13-*.jar")):
        return libs
    mvn = _require("mvn", "to fetch Apache Kafka from Maven Central")
    _require("java", "to run the Kafka broker")
    cache_dir().mkdir(parents=True, exist_ok=True)
    pom = cache_dir() / "pom.xml"
    pom.write_text(resources.files("sagaz.testing").joinpath(_POM).read_text())
    tmp_libs = cache_dir() / "libs.partial"
    shutil.rmtree(tmp_libs, ignore_errors=True)
    cmd = [
        mvn, "-B", *(["-q"] if quiet else []), "-f", str(pom),
        "dependency:copy-dependencies", "-DincludeScope=runtime",
        f"-DoutputDirectory={tmp_libs}", f"-Dkafka.version={KAFKA_VERSION}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise KafkaToolError(
            f"Maven could not resolve org.apache.kafka:kafka_2.13:{KAFKA_VERSION} "
            f"(exit {proc.returncode}). Check that Maven Central is reachable and "
            f"~/.m2/settings.xml is sane. Command: {' '.join(cmd)}\n{tail}"
        )
    # Swap in atomically so an interrupted resolution never looks complete.
    shutil.rmtree(libs, ignore_errors=True)
    tmp_libs.rename(libs)
    marker.write_text(KAFKA_VERSION)
    return libs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


_LOG4J = """\
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File={log}
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
log4j.logger.state.change.logger=WARN
"""


_SECURE_PROTOCOLS = ("SASL_PLAINTEXT", "SSL", "SASL_SSL")


class LocalKafka:
    """One KRaft broker+controller on 127.0.0.1. Use as a context manager or start()/stop()."""

    def __init__(
        self,
        *,
        port: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
        heap: str = "512m",
        partitions: int = 1,
        start_timeout: float = 90.0,
        secure: Iterable[str] = (),
        users: Mapping[str, str] | None = None,
        proxied: Iterable[str] = (),
    ) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        self.secure = tuple(dict.fromkeys(secure))
        unknown = set(self.secure) - set(_SECURE_PROTOCOLS)
        if unknown:
            raise ValueError(f"secure listeners must be among {', '.join(_SECURE_PROTOCOLS)}, "
                             f"got {sorted(unknown)}")
        self.users = dict(users if users is not None else {"sagaz": "sagaz-secret"})
        for name, password in self.users.items():
            # StorageTool's --add-scram syntax and the JAAS line cannot quote these
            if not name or not password or any(c in name + password for c in ',[]="\\ '):
                raise ValueError(f"user names and passwords must be non-empty and without "
                                 f"',[]=\" \\' or spaces, got user {name!r}")
        self.secure_ports = {p: free_port() for p in self.secure}
        # Extra PLAINTEXT listeners for fault tests: each can be advertised at the port of a
        # proxy in front of it (``advertised_ports[name]``), so every connection of a client
        # bootstrapped there (metadata names the same listener) runs through that proxy.
        self.proxied_ports = {n: free_port() for n in dict.fromkeys(proxied)}
        bad = [n for n in self.proxied_ports
               if not n.isupper() or not n.replace("_", "").isalnum()
               or n in ("PLAINTEXT", "CONTROLLER", *_SECURE_PROTOCOLS)]
        if bad:
            raise ValueError(f"proxied listener names must be upper-case [A-Z0-9_] and not a "
                             f"protocol name, got {bad}")
        self.advertised_ports: dict[str, int] = {}
        self.port = port or free_port()
        self.controller_port = free_port()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="sagaz-kafka-"))
        self.heap = heap
        self.partitions = partitions
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_in: float | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.workdir / "server.log"

    def listener(self, protocol: str) -> str:
        """host:port of the listener speaking ``protocol`` (PLAINTEXT or one of ``secure``)."""
        if protocol == "PLAINTEXT":
            return self.bootstrap_servers
        if protocol not in self.secure_ports:
            raise ValueError(f"this broker has no {protocol} listener (secure={self.secure})")
        return f"127.0.0.1:{self.secure_ports[protocol]}"

    @property
    def tls_dir(self) -> Path:
        return self.workdir / "tls"

    @property
    def ca_file(self) -> str:
        """The CA certificate (PEM) that signed the broker's and the client's certificates."""
        return str(self.tls_dir / "ca.pem")

    @property
    def client_cert(self) -> str:
        return str(self.tls_dir / "client.pem")

    @property
    def client_key(self) -> str:
        return str(self.tls_dir / "client.key")

    def _make_certificates(self) -> None:
        """A CA, a broker certificate for 127.0.0.1/localhost and a client certificate."""
        openssl = _require("openssl", "to make the test broker's TLS certificates")
        d = self.tls_dir
        d.mkdir(parents=True, exist_ok=True)

        def run(*args: str) -> None:
            proc = subprocess.run([openssl, *args], capture_output=True, text=True, cwd=d)
            if proc.returncode != 0:
                raise KafkaToolError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")

        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=sagaz test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        for name, san in (("broker", "IP:127.0.0.1,DNS:localhost"), ("client", "DNS:client")):
            (d / f"{name}.ext").write_text(
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth,clientAuth\nsubjectKeyIdentifier=hash\n"
                f"authorityKeyIdentifier=keyid\nsubjectAltName={san}\n")
            run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
            run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                "-extfile", f"{name}.ext")
        # Kafka's PEM key store: the private key (PKCS#8) followed by the certificate chain
        (d / "broker-keystore.pem").write_text((d / "broker.key").read_text()
                                               + (d / "broker.pem").read_text())

    def _secure_props(self) -> dict[str, str]:
        if not self.secure:
            return {}
        props: dict[str, str] = {}
        if any("SSL" in p for p in self.secure):
            props.update({
                "ssl.keystore.type": "PEM",
                "ssl.keystore.location": str(self.tls_dir / "broker-keystore.pem"),
                "ssl.truststore.type": "PEM",
                "ssl.truststore.location": self.ca_file,
            })
        if "SSL" in self.secure:
            props["listener.name.ssl.ssl.client.auth"] = "required"
        plain = " ".join(f'user_{u}="{pw}"' for u, pw in self.users.items())
        for p in self.secure:
            if p.startswith("SASL_"):
                name = p.lower()
                props[f"listener.name.{name}.sasl.enabled.mechanisms"] = \
                    "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512"
                props[f"listener.name.{name}.plain.sasl.jaas.config"] = \
                    f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain};"
                for m in ("scram-sha-256", "scram-sha-512"):
                    props[f"listener.name.{name}.{m}.sasl.jaas.config"] = \
                        "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        return props

    def _scram_args(self) -> list[str]:
        if not any(p.startswith("SASL_") for p in self.secure):
            return []
        return [arg for user, pw in self.users.items()
                for m in ("SCRAM-SHA-256", "SCRAM-SHA-512")
                for arg in ("--add-scram", f"{m}=[name={user},password={pw}]")]

    def _write_config(self) -> Path:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        # One listener per secured protocol, named after it, beside PLAINTEXT (inter-broker)
        broker_listeners = [f"PLAINTEXT://127.0.0.1:{self.port}"] + [
            f"{p}://127.0.0.1:{port}" for p, port in self.secure_ports.items()]
        proxied = {n: (port, self.advertised_ports.get(n, port))
                   for n, port in self.proxied_ports.items()}
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": ",".join([*broker_listeners,
                                   *(f"{n}://127.0.0.1:{p}" for n, (p, _) in proxied.items()),
                                   f"CONTROLLER://127.0.0.1:{self.controller_port}"]),
            "advertised.listeners": ",".join(
                [*broker_listeners, *(f"{n}://127.0.0.1:{a}" for n, (_, a) in proxied.items())]),
            "listener.security.protocol.map": ",".join(
                ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT",
                 *(f"{p}:{p}" for p in self.secure),
                 *(f"{n}:PLAINTEXT" for n in proxied)]),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": str(self.partitions),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "log.flush.interval.ms": "60000",
            **self._secure_props(),
        }
        cfg = self.workdir / "server.properties"
        cfg.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.workdir / "log4j.properties").write_text(_LOG4J.format(log=self.log_file))
        return cfg

    def _java(self, libs: Path, main: str, *args: str) -> list[str]:
        return [
            _require("java", "to run the Kafka broker"),
            f"-Xmx{self.heap}", "-Xms256m", "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.workdir / 'log4j.properties'}",
            "-cp", f"{libs}/*", main, *args,
        ]

    def start(self) -> LocalKafka:
        t0 = time.monotonic()
        libs = resolve()
        if any("SSL" in p for p in self.secure) and not (self.tls_dir / "ca.pem").exists():
            self._make_certificates()
        cfg = self._write_config()
        if not (self.workdir / "data" / "meta.properties").exists():  # else: a restart
            cluster_id = "-"
            while cluster_id.startswith("-"):  # StorageTool reads a leading '-' as an option
                cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            fmt = subprocess.run(self._java(libs, "kafka.tools.StorageTool", "format", "-t",
                                            cluster_id, "-c", str(cfg), *self._scram_args()),
                                 capture_output=True, text=True)
            if fmt.returncode != 0:
                raise KafkaToolError(f"formatting KRaft storage failed:\n{fmt.stdout}"
                                     f"{fmt.stderr}")
        out = open(self.workdir / "stdout.log", "wb")  # handed to the process
        self.proc = subprocess.Popen(
            self._java(libs, "kafka.Kafka", str(cfg)),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C reaches only the owner, which stops its
            # clients before the broker. It still dies with the owner (PR_SET_PDEATHSIG).
            preexec_fn=_die_with_parent, start_new_session=True,
        )
        out.close()
        atexit.register(self.stop)
        try:
            self._wait_ready(t0 + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - t0
        return self

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # works inside a running loop too
            while True:
                if self.proc.poll() is not None:
                    raise KafkaToolError(
                        f"the Kafka broker exited with code {self.proc.returncode} during start; "
                        f"last log lines:\n{self.tail_log()}"
                    )
                if _port_open(self.port) and pool.submit(
                    asyncio.run, _answers_metadata(self.bootstrap_servers)
                ).result():
                    return
                if time.monotonic() > deadline:
                    raise KafkaToolError(
                        f"the Kafka broker did not answer a metadata request within "
                        f"{self.start_timeout:.0f}s; last log lines:\n{self.tail_log()}"
                    )
                time.sleep(0.2)

    def tail_log(self, lines: int = 30) -> str:
        text = ""
        for name in ("stdout.log", "server.log"):
            p = self.workdir / name
            if p.exists():
                text += "".join(p.read_text(errors="replace").splitlines(True)[-lines:])
        return text

    def restart(self) -> None:
        """Stop the broker and start it again on the same ports and data (for fault tests)."""
        self.stop(keep_data=True)
        self.start()

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would; ``start()`` brings it back on its data."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self, timeout: float = 20.0, *, keep_data: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM: controlled shutdown
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_workdir and not keep_data:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


async def _answers_metadata(bootstrap: str) -> bool:
    from aiokafka import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await client.bootstrap()
        return bool(client.cluster.brokers())
    except Exception:
        return False
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sagaz.testing.kafka", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("resolve", help="fetch the broker's jars from Maven Central into the cache")
    st = sub.add_parser("start", help="run a broker in the foreground until Ctrl-C")
    st.add_argument("--port", type=int, default=None)
    st.add_argument("--partitions", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "resolve":
            print(resolve(quiet=False))
            return 0
        broker = LocalKafka(port=args.port, partitions=args.partitions).start()
    except KafkaToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Kafka {KAFKA_VERSION} ready at {broker.bootstrap_servers} "
          f"(started in {broker.started_in:.1f}s, log {broker.log_file}); Ctrl-C stops it",
          flush=True)
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
