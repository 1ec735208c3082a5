"""The sagaz command line: workers, participants, and saga commands and queries.

Every command that opens a Kafka client (worker, participant, start, retry, outbox run)
takes the --kafka-* security flags, given before the command; each unset flag falls back
to its SAGAZ_KAFKA_* environment variable (sagaz.security).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import Any


def _bootstrap(args: argparse.Namespace) -> str:
    return args.bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or "127.0.0.1:9092"


def _json_arg(flag: str, raw: str) -> Any:
    """A JSON argument, or ``@path`` for a file holding it."""
    try:
        if raw.startswith("@"):
            with open(raw[1:], "rb") as f:
                raw = f.read().decode()
        return json.loads(raw)
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {raw[1:]!r}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"{flag} is not valid JSON: {exc}") from None


# KafkaSecurity fields with a top-level --kafka-<field> flag (the key password: env only)
_SECURITY_FLAGS = ("security_protocol", "sasl_mechanism", "sasl_username", "sasl_password",
                   "ssl_cafile", "ssl_certfile", "ssl_keyfile")


def _security(args: argparse.Namespace) -> Any:
    """The Kafka security settings: --kafka-* flags over SAGAZ_KAFKA_* variables."""
    from sagaz.security import KafkaSecurity

    return KafkaSecurity.from_env(**{name: getattr(args, f"kafka_{name}")
                                     for name in _SECURITY_FLAGS})


def _replication(args: argparse.Namespace) -> int:
    """--replication, else $SAGAZ_REPLICATION, else 1."""
    if args.replication is not None:
        return int(args.replication)
    raw = os.environ.get("SAGAZ_REPLICATION") or "1"
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"SAGAZ_REPLICATION must be an integer >= 1, got {raw!r}") from None


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def cmd_worker(args: argparse.Namespace) -> int:
    from streams.app import run_worker
    from streams.config import Settings

    settings = Settings.from_env(
        bootstrap=args.bootstrap, prefix=args.prefix, partitions=args.partitions,
        datadir=args.datadir, worker_id=args.worker_id, web_port=args.web_port,
        sagas=tuple(args.sagas) if args.sagas else None, log_level=args.log_level,
        log_format=args.log_format, security=_security(args))
    run_worker(settings)
    return 0


def cmd_participant(args: argparse.Namespace) -> int:
    from sagaz.logs import configure
    from sagaz.participant import Participant
    from sagaz.tracing import configured_tracer
    from streams.config import load_sagas

    configure(args.log_level or "info", args.log_format)
    sagas = load_sagas(args.sagas)
    security = _security(args)

    async def main() -> None:
        storage = None
        if args.storage:  # replies survive a restart
            from sagaz.storage import open_storage

            storage = await open_storage(args.storage)
        registry = _metrics_registry(args)
        participant = Participant(args.service, sagas, bootstrap=_bootstrap(args),
                                  prefix=args.prefix or "sagaz",
                                  inbox=storage.replies if storage else None,
                                  datadir=args.datadir, concurrency=args.concurrency,
                                  replication=_replication(args),
                                  registry=registry, security=security,
                                  tracer=configured_tracer("sagaz.participant"))
        health = await _serve_health(args, registry, live=participant.live,
                                     ready=participant.ready, details=participant.health)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(participant.stop()))
        try:
            await participant.run()
        finally:
            if health is not None:
                await health.stop()
            if storage is not None:
                await storage.close()

    asyncio.run(main())
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from sagaz.client import SagaClient

    data = _json_arg("--data", args.data)
    security = _security(args)

    async def main() -> None:
        from sagaz.tracing import configured_tracer

        async with SagaClient(_bootstrap(args), prefix=args.prefix or "sagaz",
                              listen=args.wait, security=security,
                              tracer=configured_tracer("sagaz.client")) as client:
            sid = await client.start(args.saga, data, idempotency_key=args.idempotency_key)
            print(sid)
            if args.wait:
                _print(await client.wait(sid, timeout=args.timeout))

    asyncio.run(main())
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get("SAGAZ_DATABASE_URL")
    if not url:
        raise ValueError("give --url postgresql://... (or set SAGAZ_DATABASE_URL)")

    async def main() -> list[int]:
        import asyncpg

        from sagaz.errors import mask_url, safe_cause, url_for_error
        from sagaz.migrations import migrate

        try:
            conn = await asyncpg.connect(url)
        except Exception as exc:
            raise RuntimeError(f"cannot connect to PostgreSQL at {url_for_error(url)}: "
                               f"{type(exc).__name__}: {mask_url(str(exc))}"
                               ) from safe_cause(exc)
        try:
            return await migrate(conn)
        finally:
            await conn.close()

    applied = asyncio.run(main())
    print(f"applied migrations {applied}" if applied else "database is up to date")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from sagaz.client import SagaClient

    security = _security(args)

    async def main() -> None:
        async with SagaClient(_bootstrap(args), prefix=args.prefix or "sagaz",
                              listen=args.wait, security=security) as client:
            await client.retry_compensations(args.saga_id)
            print(f"retry requested for {args.saga_id}")
            if args.wait:
                _print(await client.wait(args.saga_id, timeout=args.timeout))

    asyncio.run(main())
    return 0


def _storage_url(args: argparse.Namespace) -> str:
    url = args.storage or os.environ.get("SAGAZ_STORAGE_URL") or os.environ.get(
        "SAGAZ_DATABASE_URL")
    if not url:
        raise ValueError("give --storage postgresql://... | redis://... "
                         "(or set SAGAZ_STORAGE_URL)")
    return str(url)


def _metrics_registry(args: argparse.Namespace) -> Any:
    """A registry to serve on --metrics-port (see _serve_health), or None without one."""
    if args.metrics_port is None:
        return None
    from prometheus_client import CollectorRegistry

    return CollectorRegistry(auto_describe=True)


async def _serve_health(args: argparse.Namespace, registry: Any, *, live: Any, ready: Any,
                        details: Any = None) -> Any:
    """Serve /metrics, /health/live and /health/ready on --metrics-port (None without one):
    in this process's event loop, so a blocked loop fails the liveness probe."""
    if args.metrics_port is None:
        return None
    from sagaz.health import HealthServer

    server = HealthServer(live=live, ready=ready, registry=registry, host=args.metrics_host,
                          port=args.metrics_port, details=details)
    await server.start()
    return server


def _metrics_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int,
                        help="serve Prometheus /metrics, /health/live and /health/ready here")
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="address for --metrics-port (0.0.0.0 in a container)")


def cmd_outbox(args: argparse.Namespace) -> int:
    from sagaz.storage import open_storage

    async def main() -> Any:
        storage = await open_storage(_storage_url(args))
        try:
            if args.outbox_command == "run":
                return await _run_outbox(args, storage)
            if args.outbox_command == "status":
                return await storage.outbox.counts()
            if args.outbox_command == "dead":
                return [{"event_id": e.event_id, "aggregate_id": e.aggregate_id,
                         "topic": e.topic, "event_type": e.event_type,
                         "attempts": e.attempts, "last_error": error}
                        for e, error in await storage.outbox.dead(args.limit)]
            return {"requeued": await storage.outbox.requeue(args.event_ids)}
        finally:
            await storage.close()

    result = asyncio.run(main())
    if result is not None:
        _print(result)
    return 0


async def _run_outbox(args: argparse.Namespace, storage: Any) -> None:
    from sagaz.brokers import broker_from_url
    from sagaz.logs import configure
    from sagaz.outbox import OutboxWorker

    configure(args.log_level or "info", args.log_format)
    broker_url = args.broker or os.environ.get("SAGAZ_BROKER_URL") or \
        f"kafka://{_bootstrap(args)}"
    kafka = broker_url.startswith("kafka://")
    broker = broker_from_url(broker_url, security=_security(args) if kafka else None)
    registry = _metrics_registry(args)
    worker = OutboxWorker(storage.outbox, broker, batch_size=args.batch_size,
                          poll_interval=args.poll_interval, max_attempts=args.max_attempts,
                          lease=args.lease,
                          registry=registry, metrics_interval=args.metrics_interval)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(worker.stop()))
    # up before the broker, so a probe sees "not ready" (with the reason), not no answer
    health = await _serve_health(args, registry, live=worker.live, ready=worker.ready,
                                 details=worker.health)
    try:
        await broker.start()
        try:
            await worker.run()
        finally:
            await broker.stop()
    finally:
        if health is not None:
            await health.stop()


def _query(args: argparse.Namespace, fn: str, *a: Any, **kw: Any) -> int:
    from sagaz.client import SagaClient

    async def main() -> Any:
        client = SagaClient(_bootstrap(args), prefix=args.prefix or "sagaz", url=args.url,
                            listen=False)
        return await getattr(client, fn)(*a, **kw)

    result = asyncio.run(main())
    if result is None:
        print("not found", file=sys.stderr)
        return 1
    _print(result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sagaz", description=__doc__)
    ap.add_argument("--bootstrap", help="Kafka host:port (default: $KAFKA_BOOTSTRAP_SERVERS)")
    ap.add_argument("--prefix", help="topic prefix (default: sagaz)")
    ap.add_argument("--log-format", choices=["text", "json"], default="text",
                    help="log lines for worker and participant processes")
    sec = ap.add_argument_group(
        "Kafka security", "for every command that connects to Kafka; each flag defaults to "
        "its SAGAZ_KAFKA_* variable (the password and key password best come from "
        "SAGAZ_KAFKA_SASL_PASSWORD and SAGAZ_KAFKA_SSL_KEY_PASSWORD: flags show in ps)")
    sec.add_argument("--kafka-security-protocol",
                     choices=["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"],
                     help="$SAGAZ_KAFKA_SECURITY_PROTOCOL (default PLAINTEXT)")
    sec.add_argument("--kafka-sasl-mechanism", choices=["PLAIN", "SCRAM-SHA-256",
                                                        "SCRAM-SHA-512"],
                     help="$SAGAZ_KAFKA_SASL_MECHANISM (required with SASL_*)")
    sec.add_argument("--kafka-sasl-username", help="$SAGAZ_KAFKA_SASL_USERNAME")
    sec.add_argument("--kafka-sasl-password", help="$SAGAZ_KAFKA_SASL_PASSWORD")
    sec.add_argument("--kafka-ssl-cafile",
                     help="PEM CA certificates ($SAGAZ_KAFKA_SSL_CAFILE; default: system CAs)")
    sec.add_argument("--kafka-ssl-certfile",
                     help="PEM client certificate for mutual TLS ($SAGAZ_KAFKA_SSL_CERTFILE)")
    sec.add_argument("--kafka-ssl-keyfile",
                     help="PEM private key of the client certificate "
                          "($SAGAZ_KAFKA_SSL_KEYFILE; key password: $SAGAZ_KAFKA_SSL_KEY_PASSWORD)")
    sub = ap.add_subparsers(dest="command", required=True)

    w = sub.add_parser("worker", help="run an orchestrator stream worker")
    w.add_argument("--sagas", nargs="+", help="modules (or module:attr) defining sagas")
    w.add_argument("--partitions", type=int)
    w.add_argument("--datadir")
    w.add_argument("--worker-id")
    w.add_argument("--web-port", type=int)
    w.add_argument("--log-level")
    w.set_defaults(fn=cmd_worker)

    p = sub.add_parser("participant", help="run a participant service")
    p.add_argument("--service", required=True)
    p.add_argument("--sagas", nargs="+", required=True)
    p.add_argument("--storage", help="keep replies in postgresql://... or redis://... "
                                     "(default: a RocksDB inbox backed by a compacted Kafka "
                                     "topic, restored on restart)")
    p.add_argument("--datadir", help="where the default inbox keeps its RocksDB files "
                                     "(default: a temporary directory, restored from Kafka)")
    p.add_argument("--concurrency", type=int, default=64,
                   help="commands run at once (a step's commands stay in order)")
    p.add_argument("--replication", type=int,
                   help="replicas of the inbox topic it creates (default: $SAGAZ_REPLICATION "
                        "or 1; 3 on a production cluster)")
    _metrics_options(p)
    p.add_argument("--log-level")
    p.set_defaults(fn=cmd_participant)

    s = sub.add_parser("start", help="start a saga")
    s.add_argument("saga")
    s.add_argument("--data", default="{}",
                   help="JSON object: the saga's initial context (@file: read it from a file)")
    s.add_argument("--idempotency-key")
    s.add_argument("--wait", action="store_true", help="wait for and print the outcome")
    s.add_argument("--timeout", type=float, default=60.0)
    s.set_defaults(fn=cmd_start)

    r = sub.add_parser("retry", help="operator: retry a failed saga's compensations")
    r.add_argument("saga_id")
    r.add_argument("--wait", action="store_true", help="wait for and print the new outcome")
    r.add_argument("--timeout", type=float, default=60.0)
    r.set_defaults(fn=cmd_retry)

    url_default = os.environ.get("SAGAZ_URL", "http://127.0.0.1:6066")
    url_help = "a worker's HTTP address (default: $SAGAZ_URL or http://127.0.0.1:6066)"
    st = sub.add_parser("status", help="show one saga")
    st.add_argument("saga_id")
    st.add_argument("--url", default=url_default, help=url_help)
    st.set_defaults(fn=lambda a: _query(a, "status", a.saga_id))

    ls = sub.add_parser("list", help="list sagas, newest first (every worker's, merged)")
    ls.add_argument("--status")
    ls.add_argument("--name")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--url", default=url_default, help=url_help)
    ls.set_defaults(fn=lambda a: _query(a, "list", status=a.status, name=a.name,
                                        limit=a.limit))

    db = sub.add_parser("db", help="database commands")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    mig = dbsub.add_parser("migrate", help="apply sagaz's SQL migrations (idempotent)")
    mig.add_argument("--url", help="PostgreSQL URL (default: $SAGAZ_DATABASE_URL)")
    mig.set_defaults(fn=cmd_migrate)

    ob = sub.add_parser("outbox", help="run an outbox worker; inspect and requeue events")
    obsub = ob.add_subparsers(dest="outbox_command", required=True)
    storage_help = "postgresql://..., redis://... (default: $SAGAZ_STORAGE_URL)"
    run = obsub.add_parser("run", help="publish pending events until SIGTERM")
    run.add_argument("--broker", help="kafka://host:port, amqp://..., memory:// "
                                      "(default: $SAGAZ_BROKER_URL or kafka://--bootstrap)")
    run.add_argument("--batch-size", type=int, default=500)
    run.add_argument("--poll-interval", type=float, default=0.1)
    run.add_argument("--max-attempts", type=int, default=10)
    run.add_argument("--lease", type=float, default=30.0,
                     help="seconds a dead worker's batch stays claimed before others take it")
    _metrics_options(run)
    run.add_argument("--metrics-interval", type=float, default=15.0,
                     help="seconds between refreshes of the pending/dead gauges")
    run.add_argument("--log-level")
    stat = obsub.add_parser("status", help="how many events are pending, sent, dead")
    dead = obsub.add_parser("dead", help="dead events with their last error, oldest first")
    dead.add_argument("--limit", type=int, default=100)
    req = obsub.add_parser("requeue", help="make dead events pending again")
    req.add_argument("event_ids", nargs="+")
    for cmd in (run, stat, dead, req):
        cmd.add_argument("--storage", help=storage_help)
        cmd.set_defaults(fn=cmd_outbox)

    k = sub.add_parser("kafka", help="run a local Kafka broker (Maven jars, no Docker)")
    k.set_defaults(fn=lambda a: __import__("sagaz.testing.kafka", fromlist=["main"]).main(
        ["start", "--partitions", "4"]))
    return ap


def main(argv: list[str] | None = None) -> int:
    from sagaz.errors import mask_url

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (ValueError, RuntimeError) as exc:
        # masked: the message may quote a URL given on the command line or by a library
        print(f"sagaz: error: {mask_url(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:  # unexpected: the traceback, with every URL password masked
        import traceback

        print(mask_url("".join(traceback.format_exception(exc))), end="", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
