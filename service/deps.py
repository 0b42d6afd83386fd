"""FastAPI dependencies: the per-app objects, read from ``app.state`` (set by ``create_app``)."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Request

from service.batcher import EncodeBatcher
from service.metrics import ServiceMetrics
from service.state import ServingState


# Async on purpose: FastAPI runs a plain ``def`` dependency on the thread pool, a hop per request
# for an attribute read.
async def get_state(request: Request) -> ServingState:
    return cast(ServingState, request.app.state.serving)


async def get_batcher(request: Request) -> EncodeBatcher:
    return cast(EncodeBatcher, request.app.state.batcher)


async def get_metrics(request: Request) -> ServiceMetrics:
    return cast(ServiceMetrics, request.app.state.metrics)


StateDep = Annotated[ServingState, Depends(get_state)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
BatcherDep = Annotated[EncodeBatcher, Depends(get_batcher)]
