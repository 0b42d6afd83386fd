"""Operational endpoints: liveness, readiness, model/collection info and Prometheus metrics."""

from __future__ import annotations

from typing import Literal

import anyio.to_thread
from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse

from models.manifest import ModelManifest
from service.auth import metrics_guard, require
from service.deps import MetricsDep, StateDep
from service.schemas import (
    AUTH_RESPONSES,
    CollectionInfo,
    CollectionsResponse,
    HealthResponse,
    InfoResponse,
    QueryEncoderInfo,
    ReadyResponse,
)
from service.state import ServingState
from store.errors import StoreError
from store.spec import CollectionSpec

router = APIRouter()


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    """The process is alive. Never touches the encoder or the store."""
    return HealthResponse()


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "Not ready; `reasons` says why."}},
)
async def readyz(state: StateDep) -> JSONResponse:
    """Ready when the query encoder is loaded, the store answers, and the collection exists with the
    query encoder's space and dimension. Re-checked with the store on every call."""
    readiness = await anyio.to_thread.run_sync(state.refresh)
    body = ReadyResponse(ready=readiness.ready, reasons=list(readiness.reasons))
    return JSONResponse(body.model_dump(), status_code=200 if readiness.ready else 503)


def pairing(
    query: ModelManifest, spec: CollectionSpec | None
) -> Literal["symmetric", "asymmetric", "unknown"]:
    if spec is None:
        return "unknown"
    return "symmetric" if query.derived_from == spec.encoder_fingerprint else "asymmetric"


def pairing_note(query: ModelManifest, spec: CollectionSpec | None) -> str:
    """How queries and documents are paired, from what the manifests and the collection record."""
    quantization = query.quantization or "not quantized"
    query_side = (
        f"queries are encoded by {query.name!r} ({query.architecture}, {quantization}, "
        f"source: {query.source or 'unrecorded'}) into space {query.space!r}"
    )
    if spec is None:
        return f"{query_side}; the document side is unknown until the store answers."
    fingerprint = spec.encoder_fingerprint[:12] or "unrecorded"
    note = (
        f"Documents were encoded by {spec.encoder!r} (fingerprint {fingerprint}) into space "
        f"{spec.space!r}; {query_side}."
    )
    if pairing(query, spec) == "symmetric":
        note += (
            " Symmetric pair: the query encoder is an export of the document encoder itself, not a small "
            "encoder aligned to an LLM document space."
        )
    else:
        note += " Asymmetric pair: the query encoder was trained into the document encoder's space."
    if query.figures:
        measured = ", ".join(f"{label} {value:g}" for label, value in query.figures.items())
        note += f" Measured: {measured} (card: {query.card or 'none'})."
    return note


def _collection_info(state: ServingState) -> CollectionInfo:
    if state.spec is None:
        state.refresh()
    points: int | None = None
    version: str | None = None
    if state.spec is not None:
        try:
            points = state.store.count(state.collection)
            version = state.store.aliases().get(state.collection)
        except StoreError:
            pass
    return CollectionInfo(name=state.collection, spec=state.spec, points=points, version=version)


@router.get(
    "/info", response_model=InfoResponse, responses=AUTH_RESPONSES, dependencies=[Depends(require("search"))]
)
async def info(state: StateDep) -> InfoResponse:
    """The query encoder's manifest summary, the collection's spec and size, and how they pair."""
    collection = await anyio.to_thread.run_sync(_collection_info, state)
    manifest = state.query_manifest
    return InfoResponse(
        query_encoder=QueryEncoderInfo(
            name=manifest.name,
            space=manifest.space,
            fingerprint=manifest.fingerprint,
            quantization=manifest.quantization,
            dim=manifest.dim,
            max_tokens=manifest.max_tokens,
            card=manifest.card,
            figures=manifest.figures,
        ),
        collection=collection,
        pairing=pairing(manifest, collection.spec),
        pairing_note=pairing_note(manifest, collection.spec),
    )


@router.get(
    "/collections",
    response_model=CollectionsResponse,
    responses=AUTH_RESPONSES,
    dependencies=[Depends(require("search"))],
)
async def collections(state: StateDep) -> CollectionsResponse:
    """The collection this service searches, its spec (encoder, space, dim) and point count.

    One service serves one collection (an alias on a Qdrant server); other collections in the same
    store are not listed: they belong to other deployments.
    """
    served = await anyio.to_thread.run_sync(_collection_info, state)
    return CollectionsResponse(served=state.collection, collections=[served])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, **AUTH_RESPONSES},
    dependencies=[Depends(metrics_guard)],
)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text exposition of this app's registry."""
    content, content_type = metrics.render()
    return Response(content=content, media_type=content_type)
