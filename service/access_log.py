"""One record per HTTP request: a request id the client can quote, an access-log line, its metrics.

The id comes from the client's ``X-Request-ID`` when it is a plain token (so a gateway's id follows the
request through), otherwise a fresh one; either way it is returned in the response header. The
record holds method, route template, status and latency: never the body, the query string or the
raw path, so a patient's query cannot reach the log through it.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import CLIENT_CLOSED, RouteTemplates, ServiceMetrics

REQUEST_ID_HEADER = "x-request-id"
# Echoed into headers and logs: plain tokens only, so a client cannot inject log lines or headers.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

access_logger = logging.getLogger("medsearch.access")


def request_id_from(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER.encode():
            candidate = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


class RequestRecordMiddleware:
    """Per HTTP request, once: its id (header), its access-log record and its Prometheus count and
    latency, all labelled with the same status and route template, including requests rejected by
    middleware further in and clients that leave before any response (499)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: RouteTemplates) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope)
        start = time.perf_counter()
        # The arrival time lets a handler measure what came before it (service/routes/search.py).
        scope.setdefault("state", {}).update(request_id=request_id, received_at=start)
        status = CLIENT_CLOSED  # until a response starts: the client may leave before one is sent

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            if status == CLIENT_CLOSED:
                status = 500
            raise
        finally:
            seconds = time.perf_counter() - start
            route = self.routes.label(scope)
            labels = {"route": route, "status": str(status)}
            self.metrics.requests.labels(**labels).inc()
            self.metrics.request_latency.labels(**labels).observe(seconds)
            access_logger.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "route": route,
                    "status": status,
                    "latency_ms": round(seconds * 1000, 3),
                },
            )


# Attributes every LogRecord has; anything else on a record was passed in ``extra``.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)
