"""A TCP proxy on loopback that a test controls: cut every connection (and refuse new
ones) to simulate a dependency going away, then heal it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.down = False
        self.latency = 0.0  # seconds added before each chunk is forwarded, either way
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> Proxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def cut(self) -> None:
        """Drop every open connection; refuse new ones until ``heal``."""
        self.down = True
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._writers.clear()

    def heal(self) -> None:
        self.down = False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            # Reader and writer apart, so ``latency`` delays each chunk without capping the
            # rate: chunks queue with their due time.
            queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

            async def forward() -> None:
                loop = asyncio.get_running_loop()
                while True:
                    due, data = await queue.get()
                    if not data:
                        return
                    if due > loop.time():
                        await asyncio.sleep(due - loop.time())
                    dst.write(data)
                    await dst.drain()

            writer_task = asyncio.create_task(forward())
            try:
                loop = asyncio.get_running_loop()
                while data := await src.read(65536):
                    queue.put_nowait((loop.time() + self.latency, data))
                    if writer_task.done():
                        break
                queue.put_nowait((0.0, b""))
                await writer_task
            except (Exception, asyncio.CancelledError):  # a side went away, or was cut
                pass
            finally:
                writer_task.cancel()
                with contextlib.suppress(Exception):
                    dst.transport.abort()

        tasks: list[Any] = [asyncio.create_task(pipe(reader, up_writer)),
                            asyncio.create_task(pipe(up_reader, writer))]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._writers.difference_update((writer, up_writer))
