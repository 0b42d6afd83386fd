"""The API fuzzed from its own OpenAPI schema (schemathesis, property-based), against a real uvicorn
server on loopback with the embedded store: no 5xx, every answer conforms to the schema it documents,
every error body well-formed. Then hostile inputs the schema cannot describe."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import hypothesis
import pytest
import schemathesis
from pydantic import SecretStr
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.app import create_app
from service.state import ServingState
from settings import Settings
from store.factory import open_store
from tests.servers import uvicorn_thread
from tests.test_service import COLLECTION, HashEncoder, build_collection

SEARCH_KEY, ADMIN_KEY = "fuzz-search-key-0123456789", "fuzz-admin-key-0123456789"
ERROR_FIELDS = {"error", "message"}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("fuzz")
    settings = Settings(
        home=home,
        collection=COLLECTION,
        query_model="hash-query",
        api_keys=SecretStr(f"search:{SEARCH_KEY},admin:{ADMIN_KEY}"),
        request_timeout_s=5.0,
    )
    store = open_store(None, settings.store_path)
    build_collection(store, HashEncoder())
    state = ServingState(settings=settings, encoder=HashEncoder(), store=store)
    with uvicorn_thread(create_app(settings, state)) as url:
        yield url
    state.close()


# The committed snapshot is the served schema (tests/test_service.py checks they are equal), so the
# operations are known at collection time without a running server.
SCHEMA = schemathesis.openapi.from_dict(
    json.loads((Path(__file__).with_name("openapi.json")).read_text(encoding="utf-8"))
)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
FUZZ = hypothesis.settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    derandomize=True,  # CI reruns the same cases: a failure is reproducible
    database=None,
)


# Negative cases need something to break: operations with a body or parameters.
CASES = [("positive", op) for op in OPERATIONS] + [
    ("negative", op) for op in OPERATIONS if op.body or list(op.iter_parameters())
]


@pytest.mark.parametrize(("mode", "operation"), CASES, ids=[f"{m}-{op.label}" for m, op in CASES])
def test_fuzz_every_operation(mode: str, operation, base_url: str) -> None:
    """Schema-valid inputs (positive) and schema-violating ones (negative): never a 5xx, every answer
    as documented, every error a JSON body with `error` and `message`."""
    from schemathesis import GenerationMode

    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))

    @FUZZ
    @hypothesis.given(case=strategy)
    def check(case: schemathesis.Case) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {ADMIN_KEY}"}
        response = case.call(base_url=base_url)
        assert response.status_code < 500, (
            f"{case.method} {case.path}: {response.status_code} {response.text}"
        )
        if mode == "positive" or response.status_code < 400:
            # A schema-valid body can still be refused for what the schema cannot say (a filter on
            # a field the collection does not index): those 422s are checked below, not as failures.
            case.validate_response(response, excluded_checks=[positive_data_acceptance])
        if response.status_code >= 400:
            content_type = response.headers.get("content-type") or [""]  # a list per header here
            assert content_type[0].startswith("application/json"), response.text
            assert set(response.json()) >= ERROR_FIELDS, response.text

    check()


# --- hostile inputs the schema cannot describe ----------------------------------------------------


def _post(base_url: str, body: bytes, content_type: str = "application/json") -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": content_type}
    return httpx.post(f"{base_url}/v1/search", content=body, headers=headers, timeout=30)


def _assert_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= ERROR_FIELDS, body
    return body


@pytest.mark.parametrize(
    ("name", "body", "status"),
    [
        ("1 MB query", json.dumps({"query": "痛" * 350_000}).encode(), 413),
        ("invalid UTF-8", b'{"query": "\xff\xfe\xfa"}', 400),
        ("JSON bomb: 100k nested arrays", b"[" * 100_000 + b"]" * 100_000, 413),
        (
            "nested 5k deep under 64 KB",
            b'{"query": "x", "filter": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
            400,
        ),
        (
            "deeply nested filter",
            json.dumps({"query": "x", "filter": {"must": [{"must": [{"key": "a"}]}]}}).encode(),
            422,
        ),
        ("huge top_k", json.dumps({"query": "x", "top_k": 10**12}).encode(), 422),
        ("top_k as string", json.dumps({"query": "x", "top_k": "10"}).encode(), 422),
        ("NaN threshold", b'{"query": "x", "score_threshold": NaN}', 422),
        ("empty body", b"", 400),
        ("a JSON string", b'"query"', 422),
        ("NUL in the query", json.dumps({"query": "a\u0000b"}).encode(), 200),
        ("RTL and emoji", json.dumps({"query": "\u202eصداع 🤕 头痛\u202c"}).encode(), 200),
        ("lone surrogate escape", b'{"query": "\\ud800"}', 422),
    ],
)
def test_hostile_bodies_get_a_clear_answer(base_url: str, name: str, body: bytes, status: int) -> None:
    response = _post(base_url, body)
    if status == 200:
        assert response.status_code == 200, response.text
        assert isinstance(response.json()["hits"], list)
    else:
        _assert_error(response, status)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_wrong_content_types_are_refused(base_url: str, content_type: str) -> None:
    response = _post(base_url, json.dumps({"query": "头痛"}).encode(), content_type)
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()) >= ERROR_FIELDS


def test_a_slow_body_is_cut_off_and_the_service_keeps_answering(base_url: str) -> None:
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = (
            "POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {ADMIN_KEY}\r\nContent-Length: 1000\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"query": "')
        started = time.monotonic()
        # The rest never comes: the request deadline answers (or closes) instead of waiting forever.
        reply = b""
        while b"body_timeout" not in reply and (part := sock.recv(4096)):
            reply += part
        waited = time.monotonic() - started
    assert waited < 15, waited
    assert reply.split(b" ")[1] == b"408" and b"body_timeout" in reply, reply[:300]
    assert httpx.get(f"{base_url}/healthz").status_code == 200
