"""A Qdrant REST stand-in for fault tests: the endpoints the service reads, answered by
qdrant-client's local mode over real HTTP on loopback.

These machines have no Qdrant server binary. The stand-in lets ServerStore's real path (qdrant-client
REST, httpx, timeouts, the unreachable/refused mapping) run against a port that dies and comes back;
answers are local mode's own pydantic models, the same ones the REST client parses.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from qdrant_client import QdrantClient, models
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def _ok(result: Any) -> JSONResponse:
    if isinstance(result, BaseModel):
        result = result.model_dump(mode="json", exclude_none=True)
    return JSONResponse({"result": result, "status": "ok", "time": 0.0})


def qdrant_rest_app(local: QdrantClient, api_key: str | None = None) -> Starlette:
    """Read endpoints of Qdrant's REST API over ``local`` (a ':memory:' or path client); with
    ``api_key``, requests without that ``api-key`` header get Qdrant's 401."""

    async def check_key(request: Request, call_next: RequestResponseEndpoint) -> Response:
        if api_key is not None and request.headers.get("api-key") != api_key:
            return JSONResponse({"status": {"error": "Invalid api-key"}}, status_code=401)
        return await call_next(request)

    async def collections(request: Request) -> JSONResponse:
        return _ok(local.get_collections())

    async def exists(request: Request) -> JSONResponse:
        return _ok({"exists": local.collection_exists(request.path_params["name"])})

    async def collection(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        if not local.collection_exists(name):
            return JSONResponse({"status": {"error": f"Collection `{name}` doesn't exist!"}}, status_code=404)
        return _ok(local.get_collection(name))

    async def aliases(request: Request) -> JSONResponse:
        return _ok(local.get_aliases())

    async def count(request: Request) -> JSONResponse:
        body = models.CountRequest.model_validate(await request.json())
        return _ok(local.count(request.path_params["name"], count_filter=body.filter, exact=bool(body.exact)))

    async def query(request: Request) -> JSONResponse:
        body = models.QueryRequest.model_validate(await request.json())
        return _ok(
            local.query_points(
                request.path_params["name"],
                query=body.query,  # type: ignore[arg-type]  # a plain vector is a NearestQuery here too
                using=body.using,
                prefetch=body.prefetch,
                query_filter=body.filter,
                limit=body.limit or 10,
                offset=body.offset,
                with_payload=body.with_payload if body.with_payload is not None else True,
                score_threshold=body.score_threshold,
            )
        )

    async def query_groups(request: Request) -> JSONResponse:
        body = models.QueryGroupsRequest.model_validate(await request.json())
        return _ok(
            local.query_points_groups(
                request.path_params["name"],
                group_by=body.group_by,
                query=body.query,  # type: ignore[arg-type]
                using=body.using,
                prefetch=body.prefetch,
                query_filter=body.filter,
                limit=body.limit or 10,
                group_size=body.group_size or 3,
                with_payload=body.with_payload if body.with_payload is not None else True,
                score_threshold=body.score_threshold,
            )
        )

    return Starlette(
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=check_key)],
        routes=[
            Route("/collections", collections),
            Route("/collections/{name}/exists", exists),
            Route("/collections/{name}", collection),
            Route("/aliases", aliases),
            Route("/collections/{name}/points/count", count, methods=["POST"]),
            Route("/collections/{name}/points/query", query, methods=["POST"]),
            Route("/collections/{name}/points/query/groups", query_groups, methods=["POST"]),
        ],
    )
