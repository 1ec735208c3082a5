"""How every Kafka client of sagaz reaches a secured cluster: SASL, TLS, or both.

One frozen ``KafkaSecurity`` value carries the settings; each client (participant, saga
client, inbox consumer, topic admin, outbox broker, the Faust worker) takes it as
``security=`` and turns it into its own keyword arguments, so a cluster that works for one
works for all. ``None`` means PLAINTEXT, as before.

    security = KafkaSecurity.from_env()          # SAGAZ_KAFKA_* variables
    security = KafkaSecurity("SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                             sasl_username="orders", sasl_password=secret,
                             ssl_cafile="/etc/kafka/ca.pem")
    AIOKafkaProducer(bootstrap_servers=..., **security.client_options())

Every setting is checked when the value is made (unknown protocol or mechanism, SASL
without a user, files that do not exist or do not load, a setting that the protocol would
silently ignore), and the message names the setting by its field, its environment variable
and its CLI flag. The passwords never appear in ``repr``, ``str`` or an error.

A wrong password is not a hang: aiokafka fails its bootstrap at once, but says only "Unable
to bootstrap from [...]" and logs the cause. ``start_client`` bounds a client's start, stops
it on failure, asks the first broker directly what went wrong (authentication failed,
certificate rejected, connection refused) and raises ``KafkaConnectError`` naming the
bootstrap servers, the protocol, the mechanism and the user, never the password.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from sagaz.errors import SagazError

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
#: Seconds a Kafka client may take to start (bootstrap) before it counts as unreachable.
START_TIMEOUT = 30.0
_SECRET_FIELDS = frozenset({"sasl_password", "ssl_key_password"})
_NO_FLAG = frozenset({"ssl_key_password"})  # environment only: a flag shows in `ps`


class KafkaSecurityError(SagazError, ValueError):
    """A Kafka security setting is missing or wrong; the message names it."""


class KafkaConnectError(SagazError, RuntimeError):
    """A Kafka client could not connect (unreachable, TLS or SASL authentication failed).

    The message names the bootstrap servers, the protocol, the mechanism and the user."""


def env_name(name: str) -> str:
    """The environment variable of a ``KafkaSecurity`` field."""
    return f"SAGAZ_KAFKA_{name.upper()}"


def flag_name(name: str) -> str | None:
    """The top-level CLI flag of a ``KafkaSecurity`` field (None: environment only)."""
    return None if name in _NO_FLAG else "--kafka-" + name.replace("_", "-")


def _setting(name: str) -> str:
    flag = flag_name(name)
    return f"{name} ({env_name(name)}" + (f", {flag})" if flag else ")")


@dataclass(frozen=True)
class KafkaSecurity:
    """Kafka client security settings; see the module docstring. Immutable and checked."""

    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_key_password: str | None = field(default=None, repr=False)
    # The loaded TLS context, shared by every client made from this value.
    _ssl_context: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.init and value is not None and not isinstance(value, str):
                got = type(value).__name__ if f.name in _SECRET_FIELDS else repr(value)
                raise KafkaSecurityError(f"setting {_setting(f.name)} must be a string, "
                                         f"got {got}")
            if f.init and value == "":  # an empty variable means unset
                object.__setattr__(self, f.name, None)
        protocol = self.security_protocol
        if protocol not in PROTOCOLS:
            raise KafkaSecurityError(f"setting {_setting('security_protocol')} must be one of "
                                     f"{', '.join(PROTOCOLS)}, got {protocol!r}")
        if self.sasl:
            if self.sasl_mechanism is None:
                raise KafkaSecurityError(
                    f"setting {_setting('sasl_mechanism')} is required with security protocol "
                    f"{protocol}: one of {', '.join(MECHANISMS)}")
            if self.sasl_mechanism not in MECHANISMS:
                raise KafkaSecurityError(f"setting {_setting('sasl_mechanism')} must be one of "
                                         f"{', '.join(MECHANISMS)}, got {self.sasl_mechanism!r}")
            for name in ("sasl_username", "sasl_password"):
                if getattr(self, name) is None:
                    raise KafkaSecurityError(f"setting {_setting(name)} is required with "
                                             f"SASL mechanism {self.sasl_mechanism}")
        else:
            for name in ("sasl_mechanism", "sasl_username", "sasl_password"):
                if getattr(self, name) is not None:
                    raise KafkaSecurityError(
                        f"setting {_setting(name)} is set but security protocol {protocol} "
                        f"does not use SASL: set {_setting('security_protocol')} to "
                        f"SASL_PLAINTEXT or SASL_SSL")
        if not self.ssl:
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_key_password"):
                if getattr(self, name) is not None:
                    raise KafkaSecurityError(
                        f"setting {_setting(name)} is set but security protocol {protocol} "
                        f"does not use TLS: set {_setting('security_protocol')} to SSL or "
                        f"SASL_SSL")
            return
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise KafkaSecurityError(f"setting {_setting('ssl_keyfile')} needs "
                                     f"{_setting('ssl_certfile')}, the client certificate")
        if self.ssl_key_password is not None and self.ssl_certfile is None:
            raise KafkaSecurityError(f"setting {_setting('ssl_key_password')} needs "
                                     f"{_setting('ssl_certfile')}, the client certificate")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise KafkaSecurityError(f"setting {_setting(name)}: no such file {path!r}")
        object.__setattr__(self, "_ssl_context", self._load_ssl_context())

    def _load_ssl_context(self) -> Any:
        import ssl

        from aiokafka.helpers import create_ssl_context

        try:
            context = create_ssl_context(cafile=self.ssl_cafile)
        except (ssl.SSLError, OSError, ValueError) as exc:
            where = repr(self.ssl_cafile) if self.ssl_cafile else "the system's CA store"
            raise KafkaSecurityError(f"setting {_setting('ssl_cafile')}: cannot load CA "
                                     f"certificates from {where}: {exc}") from None
        if self.ssl_certfile is not None:
            try:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile,
                                        self.ssl_key_password)
            except (ssl.SSLError, OSError, ValueError) as exc:
                names = ["ssl_certfile"] + (["ssl_keyfile"] if self.ssl_keyfile else []) + (
                    ["ssl_key_password"] if self.ssl_key_password else [])
                raise KafkaSecurityError(
                    f"settings {', '.join(_setting(n) for n in names)}: cannot load the "
                    f"client certificate {self.ssl_certfile!r}"
                    + (f" with key {self.ssl_keyfile!r}" if self.ssl_keyfile else "")
                    + f" (a PEM certificate and its private key, the key password if it is "
                      f"encrypted): {type(exc).__name__}: {exc}") from None
        return context

    # -- construction

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None,
                 **overrides: str | None) -> KafkaSecurity:
        """Settings from the SAGAZ_KAFKA_* variables; non-None ``overrides`` (by field name,
        e.g. from CLI flags) win over the environment."""
        env = os.environ if env is None else env
        names = [f.name for f in fields(cls) if f.init]
        unknown = set(overrides) - set(names)
        if unknown:
            raise TypeError(f"unknown KafkaSecurity settings {sorted(unknown)}")
        values: dict[str, Any] = {}
        for name in names:
            value = overrides.get(name)
            if value is None:
                value = env.get(env_name(name))
            if value is not None:
                values[name] = value
        return cls(**values)

    # -- views

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def ssl_context(self) -> Any:
        """The TLS context (with CA and client certificate loaded); None without TLS."""
        return self._ssl_context

    def describe(self) -> str:
        """For messages: the protocol, mechanism and user; never a password."""
        text = self.security_protocol
        if self.sasl:
            text += f", SASL {self.sasl_mechanism} as user {self.sasl_username!r}"
        if self.ssl:
            text += f", CA {self.ssl_cafile!r}" if self.ssl_cafile else ", system CAs"
            if self.ssl_certfile:
                text += f", client certificate {self.ssl_certfile!r}"
        return text

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if not f.init or value is None:
                continue
            shown.append(f"{f.name}='***'" if f.name in _SECRET_FIELDS
                         else f"{f.name}={value!r}")
        return f"KafkaSecurity({', '.join(shown)})"

    __str__ = __repr__

    def redact(self, text: str) -> str:
        """``text`` with the passwords replaced by ``***`` (for errors from libraries)."""
        for secret in (self.sasl_password, self.ssl_key_password):
            if secret:
                text = text.replace(secret, "***")
        return text

    # -- what clients take

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka's producer, consumer, client and admin client."""
        options: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.sasl:
            options.update(sasl_mechanism=self.sasl_mechanism,
                           sasl_plain_username=self.sasl_username,
                           sasl_plain_password=self.sasl_password)
        if self.ssl:
            options["ssl_context"] = self._ssl_context
        return options

    def faust_credentials(self) -> Any:
        """``broker_credentials=`` for faust.App (None for PLAINTEXT).

        faust 0.15 passes these to every aiokafka client it makes: the worker and client
        consumers, the producer (also the threaded and transactional ones) and, through the
        consumer's and producer's own clients, its topic creation. SASLCredentials takes
        SCRAM mechanisms; with a TLS context it becomes SASL_SSL."""
        if self.security_protocol == "PLAINTEXT":
            return None
        from faust.auth import SASLCredentials, SSLCredentials

        if self.sasl:
            return SASLCredentials(username=self.sasl_username, password=self.sasl_password,
                                   mechanism=self.sasl_mechanism,
                                   ssl_context=self._ssl_context)
        return SSLCredentials(self._ssl_context)


PLAINTEXT = KafkaSecurity()


def options(security: KafkaSecurity | None) -> dict[str, Any]:
    """``security.client_options()``, or PLAINTEXT's for None."""
    return (security or PLAINTEXT).client_options()


async def start_client(client: Any, bootstrap: str, security: KafkaSecurity | None, *,
                       what: str = "Kafka client", timeout: float = START_TIMEOUT) -> None:
    """``await client.start()`` within ``timeout`` seconds, or stop it and raise
    KafkaConnectError saying why (``what`` names the client in the message)."""
    security = security or PLAINTEXT
    try:
        async with asyncio.timeout(timeout):
            await client.start()
        return
    except Exception as exc:
        failure: BaseException = exc
    try:  # a half-started client holds sockets and tasks (the admin client has close())
        await (client.stop() if hasattr(client, "stop") else client.close())
    except Exception:
        pass
    if isinstance(failure, TimeoutError):
        cause = f"no answer within {timeout:.0f} s"
    else:
        cause = await diagnose(bootstrap, security, failure)
    raise KafkaConnectError(f"{what} cannot connect to Kafka at {bootstrap} "
                            f"({security.describe()}): {cause}") from None


async def diagnose(bootstrap: str, security: KafkaSecurity,
                   failure: BaseException | None = None, timeout: float = 10.0) -> str:
    """Why a client could not start: ask each bootstrap server directly, with the same
    settings, and report the first real error (aiokafka logs it but raises a bare
    "Unable to bootstrap"). The passwords are removed from the text."""
    from aiokafka.conn import create_conn
    from aiokafka.protocol.metadata import MetadataRequest

    causes = []
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        conn = None
        try:
            async with asyncio.timeout(timeout):  # what a bootstrap does: connect, metadata
                conn = await create_conn(host.strip("[]"), int(port), request_timeout_ms=
                                         int(timeout * 1000), **security.client_options())
                await conn.send(MetadataRequest([]))
        except TimeoutError:
            causes.append(f"{server}: no answer within {timeout:.0f} s")
        except Exception as exc:
            causes.append(f"{server}: {_explain(exc, security)}")
        finally:
            if conn is not None:
                conn.close()
    if not causes:  # every server answers now: report what the client said
        causes.append(f"{type(failure).__name__}: {failure}" if failure else "unknown error")
    return security.redact("; ".join(causes))


def _explain(exc: BaseException, security: KafkaSecurity) -> str:
    import ssl

    from aiokafka import errors

    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, errors.SaslAuthenticationFailed):
        return f"authentication failed (wrong user name or password?): {text}"
    if isinstance(exc, errors.UnsupportedSaslMechanismError):
        return f"the listener does not accept this SASL mechanism: {text}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the broker's certificate was not accepted (check the CA file): {text}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed (does the listener speak TLS, does it need a " \
               f"client certificate?): {text}"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused: {text}"
    if isinstance(exc, errors.KafkaConnectionError) and "closed" in str(exc):
        hint = f"is {security.security_protocol} this listener's security protocol"
        if security.ssl and not security.ssl_certfile:
            hint += ", or does it require a client certificate"
        return f"the broker closed the connection ({hint}?): {text}"
    return text
