"""JSON over HTTP on every worker.

GET /sagas/{id}      one saga; routed to the worker that owns the id's partition
GET /sagas?status=&name=&limit=   sagas of this worker's active partitions, newest first
GET /health/live     the process answers
GET /health/ready    tables recovered, not rebalancing
GET /metrics         Prometheus text format
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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

    @app.page("/sagas")
    async def saga_list(web: Any, request: Any) -> Any:
        query = request.query
        status, name = query.get("status"), query.get("name")
        unknown = set(query) - {"status", "name", "limit"}
        if unknown:
            return _error(web, 400, f"unknown query parameters: {sorted(unknown)}")
        if status is not None and status not in statuses:
            return _error(web, 400, f"status must be one of {sorted(statuses)}, "
                                    f"got {status!r}")
        try:
            limit = int(query.get("limit", "100"))
            if not 1 <= limit <= MAX_LIMIT:
                raise ValueError
        except ValueError:
            return _error(web, 400, f"limit must be an integer from 1 to {MAX_LIMIT}, "
                                    f"got {query.get('limit')!r}")
        found = []
        for _, row in table.items():  # this worker's active partitions
            doc = orjson.loads(row)
            st = doc["state"]
            if (status is None or st["status"] == status) and (name is None
                                                               or doc["saga"] == name):
                found.append(row)
        found.sort(key=lambda r: -orjson.loads(r)["state"]["updated_at"])
        return _json(web, {"sagas": [orch.view(r) for r in found[:limit]],
                           "count": min(limit, len(found)), "matched": len(found),
                           "scope": "this worker's partitions"})

    @app.page("/health/live")
    async def live(web: Any, request: Any) -> Any:
        return _json(web, {"status": "live"})

    @app.page("/health/ready")
    async def ready(web: Any, request: Any) -> Any:
        if oapp.ready():
            return _json(web, {"status": "ready"})
        return _json(web, {"status": "starting"}, 503)

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(oapp.metrics.registry),
                         content_type=CONTENT_TYPE_LATEST.split(";")[0])
