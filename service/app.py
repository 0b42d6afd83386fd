"""The FastAPI application factory. Everything per-app (state, metrics registry) hangs off the app."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.access_log import RequestRecordMiddleware
from service.auth import ApiKeys
from service.batcher import EncodeBatcher
from service.body_limit import BodyLimitMiddleware
from service.errors import install_error_handlers
from service.metrics import RouteTemplates, ServiceMetrics
from service.routes import health, search
from service.state import ServingState, StartupError, load_state
from settings import Settings

logger = logging.getLogger("medsearch.service")

# Version of the HTTP contract (tests/openapi.json), independent of the package version.
API_VERSION = "1.0"
API_PREFIX = "/v1"

DESCRIPTION = (
    "Medical semantic search. Documents were embedded offline by a document encoder; queries are "
    "embedded here by a small ONNX query encoder trained into the same vector space. Query text is "
    "not logged unless the operator enables it."
)


# Recent FastAPI releases emit OpenTelemetry by default (and auto-configure exporters from an
# environment variable). Queries here are patient data: no telemetry leaves the process.
_NO_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False, "auto_configure": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


async def watch_collection(state: ServingState, interval_s: float) -> None:
    """Re-read the served collection's spec every ``interval_s`` (0: never).

    This is the hot reload: when the name the service searches is an alias and a reindex moves it
    to a new collection, searches follow at once (the store resolves the alias per request) and this
    picks up the new collection's spec within one interval, refusing it (503) if it is in another
    space. Requests in flight keep the spec they started with; none is dropped.
    """
    if interval_s <= 0:
        return
    while True:
        await asyncio.sleep(interval_s)
        before = state.spec
        await anyio.to_thread.run_sync(state.refresh)
        if state.spec is not None and before is not None and state.spec != before:
            logger.info(
                "collection %r changed: documents of %r (%s) now; were %r (%s)",
                state.collection,
                state.spec.encoder,
                state.spec.encoder_fingerprint[:12],
                before.encoder,
                before.encoder_fingerprint[:12],
            )


def create_app(settings: Settings, state: ServingState | None = None) -> FastAPI:
    """Build the app. Without ``state`` the lifespan loads it from ``settings`` (and closes it on
    shutdown); a given ``state`` belongs to the caller. Either way one encode warms the encoder
    before the app reports ready."""
    metrics = ServiceMetrics()
    api_keys = ApiKeys.load(
        settings.api_keys.get_secret_value() if settings.api_keys else None,
        settings.api_keys_file,
        settings.protect_metrics,
    )
    if not api_keys.enabled:
        logger.warning("API keys are off: every client can search (set MEDSEARCH_API_KEYS or _FILE)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            serving = state if state is not None else await anyio.to_thread.run_sync(load_state, settings)
        except StartupError as exc:
            # The same one line as `medsearch serve` prints, for servers that start the app themselves
            # (uvicorn --factory, gunicorn): the traceback they add after it is theirs.
            logger.error("cannot start: %s", exc)
            raise
        batcher = EncodeBatcher(
            serving.encoder,
            metrics,
            max_batch=settings.batch_max_size,
            max_wait_s=settings.batch_max_wait_ms / 1000,
            max_pending=settings.queue_max_pending,
            cache_size=settings.query_cache_size,
            workers=settings.encoder_workers,
        )
        try:
            await anyio.to_thread.run_sync(serving.warm_up)
            app.state.serving = serving
            app.state.batcher = batcher
            batcher.start()
            watcher = asyncio.create_task(watch_collection(serving, settings.spec_refresh_s))
            try:
                yield
            finally:
                watcher.cancel()
        finally:
            await batcher.stop()  # queued queries are answered before the store closes
            if state is None:
                serving.close()

    app = FastAPI(
        title="medsearch", version=API_VERSION, description=DESCRIPTION, lifespan=lifespan, **_NO_TELEMETRY
    )
    app.state.metrics = metrics
    app.state.api_keys = api_keys
    if state is not None:
        app.state.serving = state
    install_error_handlers(app, metrics)
    # /v1 is the versioned contract; the unversioned paths stay as aliases for existing clients.
    for prefix in (API_PREFIX, ""):
        app.include_router(search.router, prefix=prefix)
        app.include_router(health.router, prefix=prefix)
    # Inside the request record (added last, outermost), so 413s are counted and logged too.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        metrics=metrics,
        timeout_s=settings.request_timeout_s,
    )
    paths = [str(getattr(route, "path", "")) for route in (*search.router.routes, *health.router.routes)]
    routes = RouteTemplates([prefix + path for prefix in (API_PREFIX, "") for path in paths])
    if settings.cors_origins:
        # Off unless origins are named: a browser page elsewhere must not read patient results.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    # Outermost: every response gets its id, and requests rejected further in are counted and logged.
    app.add_middleware(RequestRecordMiddleware, metrics=metrics, routes=routes)
    return app
