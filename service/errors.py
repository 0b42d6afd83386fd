"""The one table from exceptions to HTTP status and JSON error body.

Every error response has the shape ``{"error": kind, "message": str}`` (plus ``details`` for invalid
requests). Only messages the service composed itself reach clients: store and unexpected exceptions
get a fixed message, because their text can carry internals (hosts, paths, stack fragments).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.metrics import ServiceMetrics
from service.schemas import FILTER_FORMS
from store.errors import StoreError, StoreUnavailable
from store.filters import FilterError

logger = logging.getLogger("medsearch.service")


class ServiceError(Exception):
    """An error whose message the service wrote for clients; safe to return verbatim."""


class InvalidRequest(ServiceError):
    """The body parsed, but a value is unacceptable for this collection (e.g. an unknown filter key)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


NOT_READY_MESSAGE = "the search service is not ready; retry later"


class NotReady(ServiceError):
    """The service cannot answer searches yet; the reasons are the readiness probe's."""

    def __init__(self, reasons: Sequence[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = list(reasons)


class EncoderFailure(ServiceError):
    """The query encoder returned something unusable (e.g. NaN): a server fault, not the store's."""


class Overloaded(ServiceError):
    """The encoder queue is full: 429, the client should retry after a moment."""

    def __init__(self, pending: int) -> None:
        super().__init__(f"the service is at capacity ({pending} queries waiting); retry shortly")


class BodyTooLarge(ServiceError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit} bytes")


class BodyTimeout(ServiceError):
    """The body did not arrive in time (a stalled or deliberately slow client): 408."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request body did not arrive within {seconds:g} s")


@dataclass(frozen=True)
class ErrorKind:
    status: int
    kind: str
    # None: the exception's own message is client-safe and is used as is.
    message: str | None = None


def _field_path(loc: Sequence[Any]) -> str:
    # The filter's form tag (pydantic puts the union's tag into the path) is not a field the client wrote.
    parts = [str(p) for i, p in enumerate(loc) if not (p in FILTER_FORMS and i and loc[i - 1] == "filter")]
    if len(parts) > 1 and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts)


def validation_details(exc: RequestValidationError) -> list[dict[str, str]]:
    """Field path and reason per error; the rejected input is not echoed back."""
    return [{"field": _field_path(e.get("loc", ())), "message": str(e.get("msg", ""))} for e in exc.errors()]


class Unauthorized(ServiceError):
    """No usable API key: 401 with a Bearer challenge."""


class Forbidden(ServiceError):
    """A valid API key without the scope the endpoint needs: 403."""


# Looked up along the exception's MRO, so a subclass row (StoreUnavailable) wins over its base
# (StoreError), and Exception catches whatever is left.
ERRORS: dict[type[BaseException], ErrorKind] = {
    RequestValidationError: ErrorKind(422, "invalid_request"),
    InvalidRequest: ErrorKind(422, "invalid_request"),
    FilterError: ErrorKind(422, "invalid_request"),
    BodyTooLarge: ErrorKind(413, "body_too_large"),
    BodyTimeout: ErrorKind(408, "body_timeout"),
    Unauthorized: ErrorKind(401, "unauthorized"),
    Overloaded: ErrorKind(429, "overloaded"),
    # What anyio.fail_after raises when a route runs past MEDSEARCH_REQUEST_TIMEOUT_S, whichever route.
    TimeoutError: ErrorKind(
        504, "deadline_exceeded", "the request did not finish within the service's deadline"
    ),
    Forbidden: ErrorKind(403, "forbidden"),
    NotReady: ErrorKind(503, "not_ready"),
    StoreUnavailable: ErrorKind(503, "store_unavailable", "the vector store is unreachable; retry later"),
    StoreError: ErrorKind(502, "store_error", "the vector store refused the request"),
    EncoderFailure: ErrorKind(500, "encoder_error"),
    Exception: ErrorKind(500, "internal_error", "internal error"),
}


def classify(exc: BaseException) -> ErrorKind:
    for cls in type(exc).__mro__:
        if cls in ERRORS:
            return ERRORS[cls]
    return ERRORS[Exception]


def _malformed_json(exc: RequestValidationError) -> str | None:
    """The parser's complaint when the body is empty or not JSON at all (FastAPI reports it as a 422
    on a field named after the character offset); None for a well-formed body with bad values."""
    for error in exc.errors():
        if error.get("type") == "missing" and tuple(error.get("loc", ())) == ("body",):
            return "body: empty; expected a JSON object"
        if error.get("type") == "json_invalid":
            loc = error.get("loc", ())
            where = f" at character {loc[-1]}" if len(loc) > 1 else ""
            reason = str((error.get("ctx") or {}).get("error", error.get("msg", "")))
            return f"body: malformed JSON{where}: {reason}"
    return None


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """Status and JSON body for ``exc`` according to the table."""
    if isinstance(exc, RequestValidationError) and (malformed := _malformed_json(exc)) is not None:
        return 400, {"error": "malformed_json", "message": malformed}
    if isinstance(exc, HTTPException):
        # Routing errors (404, 405): Starlette's detail is its own fixed text.
        return exc.status_code, {"error": "http_error", "message": str(exc.detail)}
    spec = classify(exc)
    body: dict[str, Any] = {"error": spec.kind}
    if isinstance(exc, RequestValidationError):
        details = validation_details(exc)
        body["message"] = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        body["details"] = details
    elif isinstance(exc, InvalidRequest | FilterError):
        body["message"] = str(exc)
        body["details"] = [{"field": exc.field, "message": exc.detail}]
    elif isinstance(exc, NotReady):
        # The reasons name models, spaces and operator commands: they are for /readyz (the
        # orchestrator's probe, not the public API) and the operator, not for every client.
        body["message"] = NOT_READY_MESSAGE
    else:
        body["message"] = spec.message if spec.message is not None else str(exc)
    return spec.status, body


def error_response(exc: BaseException, metrics: ServiceMetrics) -> JSONResponse:
    status, body = error_body(exc)
    metrics.errors.labels(kind=body["error"]).inc()
    if isinstance(exc, StoreError) and not isinstance(exc, StoreUnavailable | FilterError):
        # Qdrant's answer can echo the request's filter values (patient data): its status only.
        logger.error(
            "the store refused a search (%s)", f"HTTP {exc.status}" if exc.status else type(exc).__name__
        )
    elif status >= 500 and not isinstance(exc, ServiceError | StoreUnavailable | TimeoutError):
        # Server-side only; the client got the fixed message. A deadline is load, not a fault: no trace.
        logger.error("request failed: %s", type(exc).__name__, exc_info=exc)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    if isinstance(exc, Overloaded):
        headers = {"Retry-After": "1"}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    async def handler(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc, metrics)

    for cls in (*ERRORS, HTTPException):
        app.add_exception_handler(cls, handler)
