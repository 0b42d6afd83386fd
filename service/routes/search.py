"""POST /search: encode the query, search the collection, return the nearest documents."""

from __future__ import annotations

import logging
import time

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from service.auth import require
from service.batcher import EncodeBatcher
from service.deps import BatcherDep, MetricsDep, StateDep
from service.errors import InvalidRequest
from service.metrics import ServiceMetrics
from service.schemas import (
    AUTH_RESPONSES,
    BatchSearchRequest,
    BatchSearchResponse,
    EmbedRequest,
    EmbedResponse,
    ErrorResponse,
    SearchHit,
    SearchRequest,
    SearchResponse,
)
from service.state import ServingState
from store.base import Hit
from store.errors import StoreError, StoreUnavailable
from store.filters import Filter, FilterLike, as_filter, checked_filter
from store.spec import CollectionSpec

logger = logging.getLogger("medsearch.service")

router = APIRouter(dependencies=[Depends(require("search"))])

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    **AUTH_RESPONSES,
    400: {"model": ErrorResponse, "description": "Body is empty or not JSON."},
    408: {
        "model": ErrorResponse,
        "description": "The body did not arrive within MEDSEARCH_REQUEST_TIMEOUT_S.",
    },
    413: {"model": ErrorResponse, "description": "Request body over the configured byte limit."},
    422: {"model": ErrorResponse, "description": "Invalid body; the message names the offending field."},
    429: {"model": ErrorResponse, "description": "Encoder queue full; retry after Retry-After seconds."},
    503: {"model": ErrorResponse, "description": "Store unreachable or collection not servable."},
    504: {"model": ErrorResponse, "description": "The request ran past MEDSEARCH_REQUEST_TIMEOUT_S."},
}


def checked_mode(request: SearchRequest, spec: CollectionSpec) -> None:
    if request.mode == "hybrid" and spec.sparse is None:
        raise InvalidRequest(
            "mode",
            "hybrid needs BM25 vectors and the collection has none; "
            "use mode 'dense' or reindex with --sparse bm25",
        )


def _search(
    state: ServingState,
    vectors: np.ndarray,
    requests: list[SearchRequest],
    filters: list[Filter | None],
    metrics: ServiceMetrics,
) -> list[list[Hit]]:
    """Every search of a call on one worker thread (one hop, however many queries)."""
    found = []
    for request, vector, where in zip(requests, vectors, filters, strict=True):
        with metrics.search_latency.time():
            sparse = state.bm25_query(request.query) if request.mode == "hybrid" else None
            found.append(
                state.store.search(
                    state.collection, vector, request.top_k, where, request.score_threshold, sparse
                )
            )
    return found


def _hit(hit: Hit, with_text: bool) -> SearchHit:
    return SearchHit(
        id=hit.doc_id,
        score=hit.score,
        title=hit.title if with_text else None,
        text=hit.text if with_text else None,
        metadata=hit.metadata,
        chunk=hit.chunk,
    )


def _json(body: BaseModel) -> Response:
    """``body`` serialised once, by pydantic: returned as a model, FastAPI would validate it again
    against the response model, turn it into a dict and then serialise that with json.dumps."""
    return Response(body.model_dump_json(), media_type="application/json")


def _validated(raw: Request, metrics: ServiceMetrics) -> None:
    """Time from the request's arrival in the app (RequestRecordMiddleware) to its handler."""
    received_at = getattr(raw.state, "received_at", None)
    if received_at is not None:
        metrics.validate_latency.observe(time.perf_counter() - received_at)


def _filter_keys(value: FilterLike | None) -> list[str]:
    full = as_filter(value)
    return [] if full is None else sorted({c.key for clause in full.clauses().values() for c in clause})


def _log_search(state: ServingState, request: SearchRequest, hits: int, took_ms: float) -> None:
    if state.settings.log_queries:
        logger.info(
            "search query=%r top_k=%d hits=%d took_ms=%.1f", request.query, request.top_k, hits, took_ms
        )
    else:
        # Query text and filter values can identify a patient: only their shape is logged.
        logger.debug(
            "search top_k=%d filter_keys=%s hits=%d took_ms=%.1f",
            request.top_k,
            _filter_keys(request.filter),
            hits,
            took_ms,
        )


async def _search_all(
    requests: list[SearchRequest], state: ServingState, batcher: EncodeBatcher, metrics: ServiceMetrics
) -> list[SearchResponse]:
    """Encode every query (one batch, shared with concurrent requests), then search each; filters
    are checked before any model work. Past the request deadline: TimeoutError (504, service/errors.py)."""
    start = time.perf_counter()
    with anyio.fail_after(state.settings.request_timeout_s):
        spec = state.known_spec()
        if spec is None:
            spec = await anyio.to_thread.run_sync(state.serving_spec, limiter=state.store_calls)
        filters = [checked_filter(spec, r.filter) for r in requests]
        for r in requests:
            checked_mode(r, spec)
        queries = [r.query for r in requests]
        try:
            if state.search_in_process:
                found = await batcher.encode_then(
                    queries, lambda vectors: _search(state, vectors, requests, filters, metrics)
                )
            else:
                vectors = await batcher.encode(queries)
                found = await anyio.to_thread.run_sync(
                    _search, state, vectors, requests, filters, metrics, limiter=state.store_calls
                )
        except StoreUnavailable as exc:
            state.store_failed(exc)
            raise
        except StoreError:
            state.spec_stale()
            raise
    took_ms = (time.perf_counter() - start) * 1000
    responses = []
    for request, hits in zip(requests, found, strict=True):
        _log_search(state, request, len(hits), took_ms)
        responses.append(
            SearchResponse(
                hits=[_hit(h, request.with_text) for h in hits],
                took_ms=round(took_ms, 3),
                query_encoder=state.query_manifest.name,
                document_encoder=spec.encoder,
                space=spec.space,
                collection=state.collection,
            )
        )
    return responses


@router.post("/search", response_model=SearchResponse, responses=ERROR_RESPONSES)
async def search(
    request: SearchRequest, raw: Request, state: StateDep, batcher: BatcherDep, metrics: MetricsDep
) -> Response:
    """Nearest documents to a free-text query.

    The query is encoded by the service's ONNX query encoder into the collection's document space.
    Queries longer than the encoder's token limit (`max_tokens` in /info) are truncated by the
    encoder, not rejected. `filter` restricts hits by the collection's declared metadata fields
    (listed in /info): values (`match`, `any`) on keyword and integer fields, ranges on integer and
    date fields, combined by `must`, `should` and `must_not`. In a collection of chunked long
    documents each document comes back once, with its best-matching chunk (`chunk`, and that
    chunk's `text`).
    """
    _validated(raw, metrics)
    (response,) = await _search_all([request], state, batcher, metrics)
    with metrics.serialize_latency.time():
        return _json(response)


@router.post("/search/batch", response_model=BatchSearchResponse, responses=ERROR_RESPONSES)
async def search_batch(
    request: BatchSearchRequest, raw: Request, state: StateDep, batcher: BatcherDep, metrics: MetricsDep
) -> Response:
    """Several searches in one call, their queries encoded in one batch; results in request order.

    Every query is validated (and every filter checked) before any is encoded: one bad query fails
    the whole call with a 422 naming it (`queries.N.field`), so nothing is half-answered.
    """
    _validated(raw, metrics)
    results = await _search_all(request.queries, state, batcher, metrics)
    with metrics.serialize_latency.time():
        return _json(BatchSearchResponse(results=results))


@router.post("/embed", response_model=EmbedResponse, responses=ERROR_RESPONSES)
async def embed(request: EmbedRequest, state: StateDep, batcher: BatcherDep) -> Response:
    """The query encoder's vectors of `texts`, labelled with their space, for systems that reuse them
    (they compare only with vectors of the same space)."""
    with anyio.fail_after(state.settings.request_timeout_s):
        vectors = await batcher.encode(request.texts)
    manifest = state.query_manifest
    return _json(
        EmbedResponse(
            vectors=vectors.tolist(), space=manifest.space, encoder=manifest.name, dim=int(vectors.shape[1])
        )
    )
