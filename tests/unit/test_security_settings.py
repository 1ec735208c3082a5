"""KafkaSecurity: every setting checked with a message naming it, passwords never shown,
and the same settings reaching aiokafka, Faust, the worker settings and the command line.
(Against a real secured broker: tests/integration/test_security.py.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sagaz.security import KafkaSecurity, KafkaSecurityError

SECRET = "s3cr3t-Pa55-x9"
SCRAM = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-256",
         "sasl_username": "alice", "sasl_password": SECRET}


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a client certificate and key, and the key encrypted with a password."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    from sagaz.testing.kafka import LocalKafka

    broker = LocalKafka(secure=("SSL",), workdir=tmp_path_factory.mktemp("kafka"))
    broker._make_certificates()  # openssl only: no broker is started
    d = broker.tls_dir
    subprocess.run(["openssl", "pkey", "-in", "client.key", "-out", "client-enc.key",
                    "-aes256", "-passout", f"pass:{SECRET}"], cwd=d, check=True)
    (d / "garbage.pem").write_text("not a certificate\n")
    return d


def error(**settings: Any) -> str:
    with pytest.raises(KafkaSecurityError) as info:
        KafkaSecurity(**settings)
    text = str(info.value)
    assert SECRET not in text and SECRET not in repr(info.value)
    return text


def test_plaintext_is_the_default_and_adds_nothing_but_the_protocol() -> None:
    assert KafkaSecurity().client_options() == {"security_protocol": "PLAINTEXT"}
    assert KafkaSecurity().faust_credentials() is None
    assert KafkaSecurity.from_env({}) == KafkaSecurity()


def test_sasl_options_for_aiokafka() -> None:
    assert KafkaSecurity(**SCRAM).client_options() == {
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "alice", "sasl_plain_password": SECRET}


@pytest.mark.parametrize(("settings", "names"), [
    ({"security_protocol": "sasl_ssl"}, ["SAGAZ_KAFKA_SECURITY_PROTOCOL",
                                         "--kafka-security-protocol", "SASL_SSL"]),
    ({**SCRAM, "sasl_mechanism": "GSSAPI"}, ["SAGAZ_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"]),
    ({**SCRAM, "sasl_mechanism": None}, ["SAGAZ_KAFKA_SASL_MECHANISM", "required"]),
    ({**SCRAM, "sasl_username": None}, ["SAGAZ_KAFKA_SASL_USERNAME", "required"]),
    ({**SCRAM, "sasl_password": ""}, ["SAGAZ_KAFKA_SASL_PASSWORD", "required"]),
    ({"sasl_mechanism": "PLAIN"}, ["SAGAZ_KAFKA_SASL_MECHANISM", "does not use SASL"]),
    ({"security_protocol": "SSL", "sasl_password": SECRET},
     ["SAGAZ_KAFKA_SASL_PASSWORD", "does not use SASL"]),
    ({**SCRAM, "ssl_cafile": "/etc/ca.pem"}, ["SAGAZ_KAFKA_SSL_CAFILE", "does not use TLS"]),
    ({"ssl_key_password": SECRET}, ["SAGAZ_KAFKA_SSL_KEY_PASSWORD", "does not use TLS"]),
    ({"security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"},
     ["SAGAZ_KAFKA_SSL_CAFILE", "no such file '/nonexistent/ca.pem'"]),
    ({"security_protocol": "SSL", "ssl_keyfile": "/k.pem"},
     ["SAGAZ_KAFKA_SSL_KEYFILE", "needs", "SAGAZ_KAFKA_SSL_CERTFILE"]),
    ({**SCRAM, "sasl_password": 12345}, ["SAGAZ_KAFKA_SASL_PASSWORD", "got int"]),
])
def test_each_wrong_setting_is_named(settings: dict[str, Any], names: list[str]) -> None:
    text = error(**settings)
    for name in names:
        assert name in text, text


def test_tls_files_must_load(tls: Path) -> None:
    ca, cert, key = (str(tls / n) for n in ("ca.pem", "client.pem", "client.key"))
    ok = KafkaSecurity("SSL", ssl_cafile=ca, ssl_certfile=cert, ssl_keyfile=key)
    assert ok.client_options() == {"security_protocol": "SSL", "ssl_context": ok.ssl_context}
    assert ok.ssl_context.check_hostname is True
    text = error(security_protocol="SSL", ssl_cafile=str(tls / "garbage.pem"))
    assert "SAGAZ_KAFKA_SSL_CAFILE" in text and "cannot load CA" in text
    text = error(security_protocol="SSL", ssl_cafile=ca, ssl_certfile=cert,
                 ssl_keyfile=str(tls / "ca.key"))  # another certificate's key
    assert "SAGAZ_KAFKA_SSL_CERTFILE" in text and "SAGAZ_KAFKA_SSL_KEYFILE" in text
    encrypted = str(tls / "client-enc.key")
    KafkaSecurity("SASL_SSL", sasl_mechanism="PLAIN", sasl_username="a", sasl_password="b",
                  ssl_cafile=ca, ssl_certfile=cert, ssl_keyfile=encrypted,
                  ssl_key_password=SECRET)
    text = error(security_protocol="SSL", ssl_cafile=ca, ssl_certfile=cert,
                 ssl_keyfile=encrypted, ssl_key_password=SECRET[::-1])
    assert "SAGAZ_KAFKA_SSL_KEY_PASSWORD" in text and SECRET[::-1] not in text


def test_passwords_never_show() -> None:
    s = KafkaSecurity(**SCRAM)
    for text in (repr(s), str(s), s.describe(), f"{s}"):
        assert SECRET not in text
    assert "sasl_password='***'" in repr(s) and "'alice'" in repr(s)
    assert s.redact(f"x {SECRET} y") == "x *** y"


def test_from_env_reads_the_fixed_names_and_overrides_win() -> None:
    env = {"SAGAZ_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
           "SAGAZ_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
           "SAGAZ_KAFKA_SASL_USERNAME": "env-user", "SAGAZ_KAFKA_SASL_PASSWORD": SECRET,
           "SAGAZ_KAFKA_SSL_CAFILE": ""}  # empty: unset (system CAs)
    s = KafkaSecurity.from_env(env, sasl_username="flag-user", sasl_mechanism=None)
    assert (s.security_protocol, s.sasl_mechanism, s.sasl_username, s.sasl_password) == \
        ("SASL_SSL", "SCRAM-SHA-512", "flag-user", SECRET)
    assert s.ssl_cafile is None and s.ssl_context is not None
    with pytest.raises(TypeError, match="sasl_pasword"):
        KafkaSecurity.from_env({}, sasl_pasword="x")


def test_faust_gets_the_same_aiokafka_settings(tls: Path) -> None:
    """faust turns broker_credentials into aiokafka kwargs for its consumers, producers and
    (through their clients) topic creation: they must equal ours."""
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    ca = str(tls / "ca.pem")
    for s in (KafkaSecurity(**SCRAM),
              KafkaSecurity("SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="a",
                            sasl_password=SECRET, ssl_cafile=ca),
              KafkaSecurity("SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="a",
                            sasl_password=SECRET),
              KafkaSecurity("SSL", ssl_cafile=ca, ssl_certfile=str(tls / "client.pem"),
                            ssl_keyfile=str(tls / "client.key"))):
        faust_kwargs = dict(credentials_to_aiokafka_auth(s.faust_credentials()))
        ours = s.client_options()
        if not s.ssl:
            assert faust_kwargs.pop("ssl_context") is None
        assert faust_kwargs == ours
        assert SECRET not in repr(s.faust_credentials())


def test_worker_settings_and_faust_app_take_the_security(tmp_path: Path) -> None:
    from streams import examples
    from streams.app import OrchestratorApp
    from streams.config import ConfigError, Settings

    env = {f"SAGAZ_KAFKA_{k.upper()}": v for k, v in SCRAM.items()}
    settings = Settings.from_env(env, datadir=str(tmp_path))
    assert settings.security == KafkaSecurity(**SCRAM)
    assert Settings.from_env({}).security == KafkaSecurity()
    with pytest.raises(ConfigError, match="SAGAZ_KAFKA_SASL_USERNAME"):
        Settings.from_env({**env, "SAGAZ_KAFKA_SASL_USERNAME": ""})
    given = KafkaSecurity("SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u",
                          sasl_password="p")  # replaces the environment's, even a bad one
    assert Settings.from_env({"SAGAZ_KAFKA_SECURITY_PROTOCOL": "bad"},
                             security=given).security is given
    with pytest.raises(ConfigError, match="KafkaSecurity"):
        Settings(security="SASL_SSL")  # type: ignore[arg-type]
    creds = OrchestratorApp(settings, [examples.order]).app.conf.broker_credentials
    assert (creds.protocol.value, creds.mechanism.value, creds.username) == \
        ("SASL_PLAINTEXT", "SCRAM-SHA-256", "alice")


def test_cli_flags_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from sagaz.cli import _security, build_parser

    monkeypatch.setenv("SAGAZ_KAFKA_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("SAGAZ_KAFKA_SASL_USERNAME", "env-user")
    args = build_parser().parse_args([
        "--kafka-security-protocol", "SASL_PLAINTEXT", "--kafka-sasl-mechanism", "PLAIN",
        "--kafka-sasl-username", "flag-user", "start", "order"])
    assert _security(args) == KafkaSecurity("SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                                            sasl_username="flag-user", sasl_password=SECRET)


def test_cli_rejects_bad_settings_naming_them(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from sagaz.cli import main

    monkeypatch.setenv("SAGAZ_KAFKA_SASL_PASSWORD", SECRET)
    assert main(["--kafka-security-protocol", "SSL", "start", "order"]) == 2
    err = capsys.readouterr().err
    assert "SAGAZ_KAFKA_SASL_PASSWORD" in err and "does not use SASL" in err
    assert SECRET not in err


def test_broker_from_url_takes_security_for_kafka_only() -> None:
    from sagaz.brokers import KafkaBroker, broker_from_url

    s = KafkaSecurity(**SCRAM)
    broker = broker_from_url("kafka://127.0.0.1:9092", security=s)
    assert isinstance(broker, KafkaBroker) and broker.security is s
    with pytest.raises(ValueError, match="applies to kafka://"):
        broker_from_url("amqp://guest:guest@127.0.0.1/", security=s)
