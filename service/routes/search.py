"""POST /search: encode the query, search the collection, return the nearest documents."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Depends

from service.auth import require
from service.deps import MetricsDep, StateDep
from service.errors import InvalidRequest
from service.metrics import ServiceMetrics
from service.schemas import ErrorResponse, SearchHit, SearchRequest, SearchResponse
from service.state import ServingState
from store.base import CollectionSpec, Hit, StoreUnavailable

logger = logging.getLogger("medsearch.service")

router = APIRouter(dependencies=[Depends(require("search"))])

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse, "description": "Body is empty or not JSON."},
    401: {"model": ErrorResponse, "description": "API keys are on and the request has no valid key."},
    413: {"model": ErrorResponse, "description": "Request body over the configured byte limit."},
    422: {"model": ErrorResponse, "description": "Invalid body; the message names the offending field."},
    503: {"model": ErrorResponse, "description": "Store unreachable or collection not servable."},
}


def checked_filter(filters: Mapping[str, str] | None, spec: CollectionSpec) -> dict[str, str] | None:
    """The filter, if every key is one of the collection's keyword fields; else InvalidRequest."""
    if not filters:
        return None
    allowed = sorted(spec.keyword_fields)
    for key in filters:
        if key not in spec.keyword_fields:
            raise InvalidRequest(f"filter.{key}", f"not a filterable field; allowed: {allowed}")
    return dict(filters)


def _encode(state: ServingState, query: str, metrics: ServiceMetrics) -> np.ndarray:
    with metrics.encode_latency.time():
        vectors = state.encoder.encode([query])
    return np.asarray(vectors[0], dtype=np.float32)


def _search(
    state: ServingState,
    vector: np.ndarray,
    top_k: int,
    filters: dict[str, str] | None,
    metrics: ServiceMetrics,
) -> list[Hit]:
    with metrics.search_latency.time():
        return state.store.search(state.collection, vector, top_k, filters)


def _hit(hit: Hit) -> SearchHit:
    return SearchHit(id=hit.doc_id, score=hit.score, title=hit.title, text=hit.text, metadata=hit.metadata)


@router.post("/search", response_model=SearchResponse, responses=ERROR_RESPONSES)
async def search(request: SearchRequest, state: StateDep, metrics: MetricsDep) -> SearchResponse:
    """Nearest documents to a free-text query.

    The query is encoded by the service's ONNX query encoder into the collection's document space.
    Queries longer than the encoder's token limit (`max_tokens` in /info) are truncated by the
    encoder, not rejected. `filter` restricts hits to exact metadata matches on the collection's
    keyword fields.
    """
    start = time.perf_counter()
    spec = await anyio.to_thread.run_sync(state.serving_spec)
    filters = checked_filter(request.filter, spec)
    vector = await anyio.to_thread.run_sync(_encode, state, request.query, metrics)
    try:
        hits = await anyio.to_thread.run_sync(_search, state, vector, request.top_k, filters, metrics)
    except StoreUnavailable as exc:
        state.store_failed(exc)
        raise
    took_ms = (time.perf_counter() - start) * 1000
    if state.settings.log_queries:
        logger.info(
            "search query=%r top_k=%d hits=%d took_ms=%.1f", request.query, request.top_k, len(hits), took_ms
        )
    else:
        # Query text and filter values can identify a patient: only their shape is logged.
        logger.debug(
            "search top_k=%d filter_keys=%s hits=%d took_ms=%.1f",
            request.top_k,
            sorted(filters or {}),
            len(hits),
            took_ms,
        )
    return SearchResponse(
        hits=[_hit(h) for h in hits],
        took_ms=round(took_ms, 3),
        query_encoder=state.query_manifest.name,
        document_encoder=spec.encoder,
        space=spec.space,
        collection=state.collection,
    )
