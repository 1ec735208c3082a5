"""An in-process orchestrator stack on the real broker, for the Kafka tests: a Faust worker
(OrchestratorApp), participants and a SagaClient."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from sagaz import Saga
from sagaz.client import SagaClient
from sagaz.participant import Participant
from sagaz.testing.kafka import free_port
from streams.app import OrchestratorApp
from streams.config import Settings

PARTITIONS = 4


class Stack:
    def __init__(self, bootstrap: str, prefix: str, datadir: str, **settings: Any) -> None:
        self.bootstrap, self.prefix, self.datadir = bootstrap, prefix, datadir
        self.overrides = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client: SagaClient = None  # type: ignore[assignment]
        self.oapp: OrchestratorApp = None  # type: ignore[assignment]
        self.participants: list[Participant] = []

    def settings(self) -> Settings:
        return Settings(bootstrap=self.bootstrap, prefix=self.prefix, partitions=PARTITIONS,
                        datadir=self.datadir, web_port=self.port, **self.overrides)


@contextlib.asynccontextmanager
async def stack(bootstrap: str, prefix: str, tmp_path: Any, sagas: list[Saga],
                services: list[str], participant_options: dict[str, Any] | None = None,
                **settings: Any) -> AsyncIterator[Stack]:
    st = Stack(bootstrap, prefix, str(tmp_path / "orchestrator"), **settings)
    st.oapp = OrchestratorApp(st.settings(), sagas)
    await st.oapp.start()
    participants = [Participant(s, sagas, bootstrap=bootstrap, prefix=prefix,
                                **(participant_options or {})) for s in services]
    st.participants = participants
    tasks = [asyncio.create_task(p.run()) for p in participants]
    try:
        async with asyncio.timeout(60):
            while not st.oapp.ready():
                await asyncio.sleep(0.05)
        async with SagaClient(bootstrap, prefix=prefix, url=st.url) as client:
            st.client = client
            yield st
    finally:
        for p in participants:
            await p.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await st.oapp.stop()


async def dead_letters(bootstrap: str, prefix: str, expect: int,
                       timeout: float = 20) -> list[Any]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(f"{prefix}.dead-letters", bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", group_id=f"{prefix}-dlq-reader")
    await consumer.start()
    got: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(got) < expect and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                got.extend(records)
    finally:
        await consumer.stop()
    return got
