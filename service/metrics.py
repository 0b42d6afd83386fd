"""Prometheus metrics, one registry per app so tests and multiple apps in a process never share counts."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Query encoding and ANN search sit in the millisecond range; the default buckets start at 5 ms.
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
UNMATCHED_ROUTE = "unmatched"


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "medsearch_http_requests_total",
            "HTTP requests by route template and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "medsearch_http_request_duration_seconds",
            "HTTP request latency by route template and status code.",
            ["route", "status"],
            buckets=FAST_BUCKETS,
            registry=self.registry,
        )
        self.encode_latency = Histogram(
            "medsearch_encode_duration_seconds",
            "Query encoding latency.",
            buckets=FAST_BUCKETS,
            registry=self.registry,
        )
        self.search_latency = Histogram(
            "medsearch_search_duration_seconds",
            "Vector store search latency.",
            buckets=FAST_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "medsearch_errors_total",
            "Error responses by kind (the 'error' field of the body).",
            ["kind"],
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def route_label(scope: Scope, known: list[BaseRoute]) -> str:
    """The route template, never the raw path, so label cardinality stays bounded.

    The router records the route it picked in the scope; requests rejected before routing (e.g. an
    oversized body) are matched against ``known``.
    """
    routed_path = getattr(scope.get("route"), "path", None)
    if isinstance(routed_path, str):
        return routed_path
    for route in known:
        if route.matches(scope)[0] is not Match.NONE:
            return str(getattr(route, "path", UNMATCHED_ROUTE))
    return UNMATCHED_ROUTE


class RequestMetricsMiddleware:
    """Counts and times every HTTP request, including those rejected by middleware further in."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: list[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            labels = {"route": route_label(scope, self.routes), "status": str(status)}
            self.metrics.requests.labels(**labels).inc()
            self.metrics.request_latency.labels(**labels).observe(time.perf_counter() - start)
