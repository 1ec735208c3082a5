"""web_bind (where the worker listens) and web_host (what it advertises) are separate."""

from __future__ import annotations

import pytest

from streams.config import ConfigError, Settings


def test_bind_and_advertised_address_are_separate_settings() -> None:
    local = Settings()
    assert (local.web_bind, local.web_host) == ("127.0.0.1", "127.0.0.1")
    assert local.canonical_url == "http://127.0.0.1:6066"
    pod = Settings.from_env({"SAGAZ_WEB_BIND": "0.0.0.0",
                             "SAGAZ_WEB_HOST": "sagaz-orchestrator-1.sagaz-orchestrator"})
    assert pod.web_bind == "0.0.0.0"
    assert pod.canonical_url == "http://sagaz-orchestrator-1.sagaz-orchestrator:6066"
    assert Settings(web_host="fd00::7", web_bind="::").canonical_url == "http://[fd00::7]:6066"


@pytest.mark.parametrize(("setting", "value"), [
    ("web_host", "0.0.0.0"),  # cannot be reached: the bind address, not an address to call
    ("web_host", "::"),
    ("web_host", "http://worker-0"),
    ("web_host", "worker-0:6066"),
    ("web_host", ""),
    ("web_bind", "0.0.0.0:6066"),
    ("web_bind", "every interface"),
    ("web_bind", ""),
])
def test_bad_addresses_are_rejected_by_name(setting: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"setting {setting} \(SAGAZ_{setting.upper()}\)"):
        Settings(**{setting: value})
