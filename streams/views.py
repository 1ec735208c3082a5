"""JSON over HTTP on every worker.

GET /sagas/{id}      one saga; routed to the worker that owns the id's partition
GET /sagas?status=&name=&limit=[&scope=local]   sagas, newest first: of every worker
                     (this one asks the others, named by the partition assignor, and
                     merges; workers that do not answer are listed under "unreachable"),
                     or with scope=local of this worker's active partitions only
GET /health/live     503 when the agent or the producer is dead (restart the pod)
GET /health/ready    503 while starting, recovering or rebalancing, or while a partition
                     is stalled or work has been pending for stall_timeout; details say why
GET /metrics         Prometheus text format
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sagaz import run as run_record
from sagaz.machine import SagaStatus

if TYPE_CHECKING:
    from streams.app import OrchestratorApp

MAX_LIMIT = 1000


def _json(web: Any, body: Any, status: int = 200) -> Any:
    return web.bytes(orjson.dumps(body), content_type="application/json", status=status)


def _error(web: Any, status: int, message: str) -> Any:
    return _json(web, {"error": message}, status)


def register(oapp: OrchestratorApp) -> None:
    app, table, orch = oapp.app, oapp.table, oapp.orchestrator
    statuses = {s.value for s in SagaStatus}

    @app.page("/sagas/{saga_id}")
    @app.table_route(table=table, match_info="saga_id")
    async def saga_detail(web: Any, request: Any, saga_id: str) -> Any:
        row = table.get(saga_id.encode())
        if row is None:
            return _error(web, 404, f"no saga {saga_id!r}")
        return _json(web, orch.view(row))

    def local(status: str | None, name: str | None,
              limit: int) -> tuple[list[dict[str, Any]], int]:
        """The newest ``limit`` matching sagas of this worker's partitions, and how many
        matched."""
        found = []
        for _, row in table.items():  # this worker's active partitions
            st = run_record.decode(row).state
            if (status is None or st.status == status) and (name is None or st.name == name):
                found.append((st.updated_at, row))
        found.sort(key=lambda f: -f[0])
        return [orch.view(r) for _, r in found[:limit]], len(found)

    async def remote(session: Any, host: str, query: dict[str, str]) -> Any:
        async with session.get(f"{host.rstrip('/')}/sagas",
                               params={**query, "scope": "local"}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
            return orjson.loads(await resp.read())

    @app.page("/sagas")
    async def saga_list(web: Any, request: Any) -> Any:
        query = request.query
        status, name = query.get("status"), query.get("name")
        unknown = set(query) - {"status", "name", "limit", "scope"}
        if unknown:
            return _error(web, 400, f"unknown query parameters: {sorted(unknown)}")
        if status is not None and status not in statuses:
            return _error(web, 400, f"status must be one of {sorted(statuses)}, "
                                    f"got {status!r}")
        scope = query.get("scope", "all")
        if scope not in ("all", "local"):
            return _error(web, 400, f"scope must be all or local, got {scope!r}")
        try:
            limit = int(query.get("limit", "100"))
            if not 1 <= limit <= MAX_LIMIT:
                raise ValueError
        except ValueError:
            return _error(web, 400, f"limit must be an integer from 1 to {MAX_LIMIT}, "
                                    f"got {query.get('limit')!r}")
        views, matched = local(status, name, limit)
        body: dict[str, Any] = {"scope": scope}
        if scope == "all":
            import aiohttp

            me = str(app.conf.canonical_url).rstrip("/")
            peers = sorted(h for h in app.router.table_metadata(table.name)
                           if str(h).rstrip("/") != me)
            forward = {k: v for k, v in query.items() if k != "scope"}
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=5)) as session:
                answers = await asyncio.gather(
                    *(remote(session, str(h), forward) for h in peers),
                    return_exceptions=True)
            unreachable = []
            for host, answer in zip(peers, answers, strict=True):
                if isinstance(answer, BaseException):
                    unreachable.append({"worker": str(host),
                                        "error": f"{type(answer).__name__}: {answer}"})
                    continue
                views += answer["sagas"]
                matched += answer["matched"]
            views.sort(key=lambda v: -v["updated_at"])
            body.update(workers=1 + len(peers), unreachable=unreachable)
        body.update(sagas=views[:limit], count=min(limit, len(views)), matched=matched)
        return _json(web, body)

    @app.page("/health/live")
    async def live(web: Any, request: Any) -> Any:
        ok, _, details = oapp.health()
        return _json(web, {"status": "live" if ok else "dead", **details}, 200 if ok else 503)

    @app.page("/health/ready")
    async def ready(web: Any, request: Any) -> Any:
        _, ok, details = oapp.health()
        return _json(web, {"status": "ready" if ok else "not ready", **details},
                     200 if ok else 503)

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(oapp.registry),
                         content_type=CONTENT_TYPE_LATEST.split(";")[0])
