"""Prometheus metrics, one registry per app so tests and multiple apps in a process never share counts."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.routing import compile_path
from starlette.types import Scope

# Query encoding and ANN search sit in the millisecond range; the default buckets start at 5 ms.
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
UNMATCHED_ROUTE = "unmatched"
# nginx's code for a request whose client went away before any response (e.g. mid-body): not a 500.
CLIENT_CLOSED = 499


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
            "Encoder run latency (tokenize + ONNX run of one batch, on the encoder thread).",
            buckets=FAST_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "medsearch_encode_queue_wait_seconds",
            "Time a query waited for an encoder thread (from the queue to the start of its run).",
            buckets=FAST_BUCKETS,
            registry=self.registry,
        )
        self.validate_latency = Histogram(
            "medsearch_request_validate_duration_seconds",
            "From a request's arrival in the app to its handler: body read, routing, JSON parsing, "
            "validation and dependencies.",
            buckets=FAST_BUCKETS,
            registry=self.registry,
        )
        self.serialize_latency = Histogram(
            "medsearch_response_serialize_duration_seconds",
            "Serialising a search response to JSON.",
            buckets=FAST_BUCKETS,
            registry=self.registry,
        )
        self.search_latency = Histogram(
            "medsearch_search_duration_seconds",
            "Vector store search latency.",
            buckets=FAST_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "medsearch_encode_batch_size",
            "Queries per encoder run (micro-batching).",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "medsearch_encode_queue_depth", "Queries waiting for the encoder.", registry=self.registry
        )
        self.cache_hits = Counter(
            "medsearch_query_cache_hits_total",
            "Queries answered from the vector cache.",
            registry=self.registry,
        )
        self.cache_misses = Counter(
            "medsearch_query_cache_misses_total", "Queries that needed the encoder.", registry=self.registry
        )
        self.errors = Counter(
            "medsearch_errors_total",
            "Error responses by kind (the 'error' field of the body).",
            ["kind"],
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RouteTemplates:
    """The service's path templates (``/v1/search``, ``/search``...), matched against a request path.

    Labels are templates, never raw paths, so their cardinality stays bounded; matching the path
    ourselves also labels requests rejected before routing (e.g. an oversized body).
    """

    def __init__(self, templates: list[str]) -> None:
        self._compiled = [(template, compile_path(template)[0]) for template in templates]

    def label(self, scope: Scope) -> str:
        path = scope.get("path", "")
        for template, pattern in self._compiled:
            if pattern.match(path):
                return template
        return UNMATCHED_ROUTE
