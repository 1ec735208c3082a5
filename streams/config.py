"""Worker settings: from arguments or SAGAZ_* environment variables, each checked.

Kafka security (SASL, TLS) is one ``sagaz.security.KafkaSecurity`` value, ``security``,
read from the SAGAZ_KAFKA_* variables by ``from_env``; None is PLAINTEXT.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sagaz.definition import Saga
from sagaz.errors import SagaDefinitionError, SagazError, mask_url
from sagaz.messages import MAX_MESSAGE_BYTES
from sagaz.security import KafkaSecurity, KafkaSecurityError


class ConfigError(SagazError, ValueError):
    """A setting is missing or wrong; the message names it."""


@dataclass(frozen=True)
class Settings:
    bootstrap: str = "127.0.0.1:9092"
    prefix: str = "sagaz"
    partitions: int = 4
    datadir: str = "var/sagaz"
    worker_id: str = "1"
    # The address other workers reach this one at: its canonical URL, to which requests for
    # the sagas it owns are routed (in Kubernetes the pod's DNS name under the headless
    # Service). Not the address to listen on: a pod's DNS name only resolves once the pod
    # is published, and binding 0.0.0.0 cannot be advertised.
    web_host: str = "127.0.0.1"
    web_bind: str = "127.0.0.1"  # the address the web server listens on (0.0.0.0 in a pod)
    web_port: int = 6066
    sagas: tuple[str, ...] = ()  # "package.module" or "package.module:attribute"
    timer_interval: float = 0.05  # seconds between timer scans
    inbox_size: int = 64  # event ids kept per saga row
    producer_linger: float = 0.0  # the producer batches anyway while a request is out
    commit_interval: float = 0.5
    # How long the group waits for a silent (crashed) worker before its partitions move.
    session_timeout: float = 10.0
    # Seconds a completed or compensated saga stays in the table (and answers queries and
    # idempotent starts) before its row is deleted; 0 keeps rows forever. Failed sagas
    # (compensation failed) are kept until an operator retries them.
    retention: float = 7 * 86400
    # Largest saga row or message, in bytes: must not exceed the broker's message.max.bytes
    # (and the topics' max.message.bytes); a step result that would pass it fails the step.
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # Seconds an input (or its outputs' acknowledgement) may be pending before the worker
    # reports itself not ready.
    stall_timeout: float = 30.0
    # Replicas of every topic the worker creates (its inputs, outputs, and faust's table
    # changelog): 1 for a local broker, 3 on a production cluster.
    replication: int = 1
    log_level: str = "info"
    log_format: str = "text"  # or "json": one JSON object per line
    # SASL/TLS of every Kafka client of the worker: Faust's consumer, producer and topic
    # creation, and the topic checks before it starts. None: PLAINTEXT.
    security: KafkaSecurity | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # passed to faust.App

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"setting {name} (SAGAZ_{name.upper()}) {why}, got "
                               f"{mask_url(repr(getattr(self, name)))}")

        if not self.bootstrap or any(
                not h.rpartition(":")[2].isdigit() or not h.rpartition(":")[0]
                or any(c in h for c in "/@ ") for h in self.bootstrap.split(",")):
            # no scheme and no user:password@: Kafka credentials are SASL settings
            raise bad("bootstrap", "must be host:port[,host:port...]")
        for name in ("partitions", "web_port", "inbox_size", "replication"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, "must be an integer >= 1")
        if isinstance(self.max_message_bytes, bool) or not isinstance(
                self.max_message_bytes, int) or not 4096 <= self.max_message_bytes <= 64 << 20:
            raise bad("max_message_bytes", "must be an integer from 4096 to 67108864 bytes")
        if isinstance(self.stall_timeout, bool) or not isinstance(
                self.stall_timeout, (int, float)) or not 1 <= self.stall_timeout <= 3600:
            raise bad("stall_timeout", "must be a number of seconds from 1 to 3600")
        if self.web_port > 65535:
            raise bad("web_port", "must be a TCP port")
        if not _is_address(self.web_bind):
            raise bad("web_bind", "must be an IP address or host name to listen on")
        if not _is_address(self.web_host) or _is_unspecified(self.web_host):
            raise bad("web_host", "must be the IP address or host name other workers reach "
                                  "this one at (not an unspecified address such as 0.0.0.0: "
                                  "that is for web_bind)")
        for name in ("timer_interval", "producer_linger", "commit_interval",
                     "session_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 60:
                raise bad(name, "must be a number of seconds between 0 and 60")
        if isinstance(self.retention, bool) or not isinstance(self.retention, (int, float)) \
                or not 0 <= self.retention < float("inf"):
            raise bad("retention", "must be a number of seconds >= 0 (0: keep forever)")
        if self.timer_interval == 0 or self.commit_interval == 0:
            raise ConfigError("timer_interval and commit_interval must be > 0")
        if self.session_timeout < 6:
            raise bad("session_timeout", "must be at least 6 seconds (Kafka's group minimum)")
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise bad("log_level", "must be debug, info, warning, error or critical")
        if self.log_format not in ("text", "json"):
            raise bad("log_format", "must be text or json")
        if self.security is not None and not isinstance(self.security, KafkaSecurity):
            raise ConfigError(f"setting security must be a sagaz.security.KafkaSecurity "
                              f"(or None for PLAINTEXT), got {type(self.security).__name__}")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        if "KAFKA_BOOTSTRAP_SERVERS" in env:
            values["bootstrap"] = env["KAFKA_BOOTSTRAP_SERVERS"]
        for f in fields(cls):
            raw = env.get(f"SAGAZ_{f.name.upper()}")
            if raw is None or f.name in ("extra", "security"):
                continue
            values[f.name] = _parse(f.name, f.type, raw)
        if overrides.get("security") is None:  # else the given one replaces SAGAZ_KAFKA_*
            try:
                values["security"] = KafkaSecurity.from_env(env)
            except KafkaSecurityError as exc:
                raise ConfigError(str(exc)) from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("sagas"), str):
            values["sagas"] = _split(values["sagas"])
        return cls(**values)

    @property
    def canonical_url(self) -> str:
        """The URL this worker advertises to the others (Faust's ``canonical_url``)."""
        host = f"[{self.web_host}]" if ":" in self.web_host else self.web_host
        return f"http://{host}:{self.web_port}"

    @property
    def tabledir(self) -> Path:
        return Path(self.datadir) / f"worker-{self.worker_id}"

    def load_sagas(self) -> list[Saga]:
        return load_sagas(self.sagas)


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _is_address(value: object) -> bool:
    """An IP address or a DNS host name (no scheme, port or path)."""
    if not isinstance(value, str) or not value or len(value) > 253:
        return False
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return _HOSTNAME.fullmatch(value) is not None


def _is_unspecified(value: str) -> bool:
    try:
        return ipaddress.ip_address(value).is_unspecified
    except ValueError:
        return False


def _split(raw: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in raw.split(",") if p.strip())


def _parse(name: str, kind: Any, raw: str) -> Any:
    kind = str(kind)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"SAGAZ_{name.upper()} must be a number, got {raw!r}") from None
    if kind.startswith("tuple"):
        return _split(raw)
    return raw


def load_sagas(specs: tuple[str, ...] | list[str]) -> list[Saga]:
    """Import saga definitions: every Saga in a module, or one attribute (Saga or list)."""
    if not specs:
        raise ConfigError("no saga definitions given: pass --sagas package.module "
                          "(or set SAGAZ_SAGAS)")
    found: list[Saga] = []
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"cannot import saga module {module_name!r}: {exc}") from None
        if attr:
            try:
                obj = getattr(module, attr)
            except AttributeError:
                raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
            objs = obj if isinstance(obj, (list, tuple)) else [obj]
        else:
            objs = [v for v in vars(module).values() if isinstance(v, Saga)]
        sagas = [o for o in objs if isinstance(o, Saga)]
        if not sagas or len(sagas) != len(objs):
            raise ConfigError(f"{spec!r} names no Saga definitions")
        for saga in sagas:
            try:
                saga.kafka_name()
            except SagaDefinitionError as exc:
                raise ConfigError(f"{spec!r}: {exc}") from None
        found.extend(s for s in sagas if s not in found)
    return found
