"""The orchestrator listens on web_bind and advertises web_host.

In Kubernetes web_host is the pod's DNS name under the headless Service, which resolves
only once the pod is published: a worker that listened on it could not start, and so would
never become ready (the Service publishes not-ready pods too, but binding to the name still
ties start-up to DNS). Here the advertised name never resolves (``.invalid``), as for a pod
not yet published: the worker must start, serve on web_bind, and advertise the name.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from sagaz.testing.kafka import free_port
from streams import examples
from streams.app import OrchestratorApp
from streams.config import Settings

pytestmark = pytest.mark.kafka

POD = "sagaz-orchestrator-0.sagaz-orchestrator.invalid"


async def test_the_worker_listens_on_web_bind_and_advertises_web_host(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    port = free_port()
    oapp = OrchestratorApp(Settings(bootstrap=kafka_bootstrap, prefix=topic_prefix,
                                    partitions=2, datadir=str(tmp_path), web_port=port,
                                    web_host=POD, web_bind="127.0.0.1"), [examples.order])
    assert oapp.app.conf.web_bind == "127.0.0.1"
    assert str(oapp.app.conf.canonical_url) == f"http://{POD}:{port}"
    await asyncio.wait_for(oapp.start(), 60)
    try:
        async with asyncio.timeout(60), aiohttp.ClientSession() as http:
            while True:
                async with http.get(f"http://127.0.0.1:{port}/health/ready") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.2)
            async with http.get(f"http://127.0.0.1:{port}/health/live") as resp:
                assert resp.status == 200
    finally:
        await oapp.stop()
