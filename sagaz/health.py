"""Health and metrics over HTTP for participant and outbox worker processes.

    server = HealthServer(live=worker.live, ready=worker.ready, registry=registry,
                          host="0.0.0.0", port=9108, details=worker.health)
    await server.start()
    ...
    await server.stop()

    GET /health/live    200 {"status": "live"}   or 503 {"status": "not live", "details": ...}
    GET /health/ready   200 {"status": "ready"}  or 503 {"status": "not ready", "details": ...}
    GET /metrics        Prometheus text from ``registry`` (404 without one)

The orchestrator serves the same paths from Faust's web server (``streams/views.py``);
this one runs inside a process's own event loop (aiohttp, which faust installs; imported
only when a server starts), so a check reads the worker's state directly, and a process
whose loop is blocked stops answering, which is what a liveness probe should see.

``live()`` and ``ready()`` are called on every request; a check that raises counts as
failing, and its error is part of the 503 details (URL passwords masked). Kubernetes
restarts a pod whose liveness fails and routes nothing to (nor counts as available) one
whose readiness fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from sagaz.errors import describe, mask_url

Check = Callable[[], bool]


class HealthServer:
    def __init__(self, *, live: Check, ready: Check, registry: Any = None,
                 host: str = "127.0.0.1", port: int = 0,
                 details: Callable[[], dict[str, Any]] | None = None) -> None:
        """``port`` 0 picks a free port (``self.port`` tells which, once started).
        ``details()``: what a 503 body reports besides the failed check (e.g. the
        worker's last error); None: nothing more."""
        for name, check in (("live", live), ("ready", ready)):
            if not callable(check):
                raise TypeError(f"{name} must be a callable returning bool, got {check!r}")
        if details is not None and not callable(details):
            raise TypeError(f"details must be a callable returning a dict, got {details!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be a TCP port (0: any free one), got {port!r}")
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be an address to bind, got {host!r}")
        self.live, self.ready, self.details = live, ready, details
        self.registry, self.host, self.port = registry, host, port
        self._runner: Any = None

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/health/live", self._live)
        app.router.add_get("/health/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise RuntimeError(f"cannot serve health and metrics on {self.host}:{self.port}: "
                               f"{exc}") from exc
        self._runner = runner
        if self.port == 0:
            self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _answer(self, check: Check, ok: str, failing: str) -> Any:
        from aiohttp import web

        error = None
        try:
            passed = bool(check())
        except Exception as exc:
            passed, error = False, mask_url(describe(exc))
        if passed:
            return web.Response(body=orjson.dumps({"status": ok}),
                                content_type="application/json")
        details: dict[str, Any] = {}
        if self.details is not None:
            try:
                details = dict(self.details())
            except Exception as exc:
                details = {"details_error": describe(exc)}
        if error is not None:
            details["check_error"] = error
        body = orjson.dumps({"status": failing, "details": details}, default=str)
        return web.Response(status=503, body=mask_url(body.decode()).encode(),
                            content_type="application/json")

    async def _live(self, request: Any) -> Any:
        return self._answer(self.live, "live", "not live")

    async def _ready(self, request: Any) -> Any:
        return self._answer(self.ready, "ready", "not ready")

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web

        if self.registry is None:
            return web.Response(status=404, text="no metrics registry\n")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})
