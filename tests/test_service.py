"""The HTTP service end to end: requests through the ASGI app (lifespan included) against the real
embedded store, with a deterministic fake query encoder so no model is needed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from models.manifest import ModelManifest, write_manifest
from service.access_log import JsonFormatter
from service.app import create_app
from service.auth import ApiKeyError
from service.errors import NOT_READY_MESSAGE
from service.server import serve
from service.state import ServingState, StartupError, load_state
from settings import Settings
from store.base import DocumentPoint, Hit, VectorStore
from store.errors import StoreError, StoreUnavailable
from store.factory import open_store
from store.filters import FilterLike
from store.server import ServerStore
from store.sparse import Bm25Encoder, SparseVector, measure_spec
from store.spec import ChunkingSpec, CollectionSpec

OPENAPI_SNAPSHOT = Path(__file__).with_name("openapi.json")
REGENERATE = (
    'regenerate with: .venv/bin/python -c "from tests.test_service import write_openapi; write_openapi()"'
)

DIM = 16
SPACE = "test-space"
COLLECTION = "medsearch"
QUERY = "crushing chest pain radiating to the left arm"
DOCS = {
    "mi": ("Myocardial infarction", QUERY, "cardiology"),
    "migraine": ("Migraine", "throbbing one-sided headache with aura", "neurology"),
    "asthma": ("Asthma", "wheezing and shortness of breath at night", "pulmonology"),
    "angina": ("Stable angina", "chest tightness on exertion relieved by rest", "cardiology"),
}


DOCUMENT_TEXTS = [text for _, text, _ in DOCS.values()]


class HashEncoder:
    """Encoder protocol, deterministically: each text maps to a unit vector seeded by its sha256."""

    def __init__(self, space: str = SPACE, dim: int = DIM) -> None:
        self.manifest = query_manifest(space, dim)

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(self.manifest.render(text).encode()).digest()[:8], "big")
            row = np.random.default_rng(seed).standard_normal(self.manifest.dim)
            rows.append(row / np.linalg.norm(row))
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), self.manifest.dim)


def query_manifest(space: str = SPACE, dim: int = DIM) -> ModelManifest:
    return ModelManifest(
        name="hash-query",
        role="query",
        format="onnx",
        architecture="HashEncoder",
        pooling="mean",
        max_tokens=32,
        dim=dim,
        space=space,
        fingerprint="0" * 64,
        quantization="int8",
    )


class SwitchableStore:
    """Wraps a real store; while ``down`` every call raises StoreUnavailable like a lost server."""

    def __init__(self, inner: VectorStore, down: bool = False) -> None:
        self.inner = inner
        self.down = down
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise StoreUnavailable("connection refused (simulated)")

    def ping(self) -> None:
        self._check()
        self.inner.ping()

    def get_collection(self, name: str) -> CollectionSpec | None:
        self._check()
        return self.inner.get_collection(name)

    def create_collection(self, name: str, spec: CollectionSpec, bulk: bool = False) -> None:
        self._check()
        self.inner.create_collection(name, spec, bulk)

    def count(self, name: str) -> int:
        self._check()
        return self.inner.count(name)

    def aliases(self) -> dict[str, str]:
        self._check()
        return self.inner.aliases()

    def content_hashes(self, name: str, doc_ids: Sequence[str]) -> dict[str, str]:
        self._check()
        return self.inner.content_hashes(name, doc_ids)

    def upsert(self, name: str, points: Sequence[DocumentPoint]) -> None:
        self._check()
        self.inner.upsert(name, points)

    def search(
        self,
        name: str,
        vector: np.ndarray,
        top_k: int,
        filters: FilterLike | None = None,
        score_threshold: float | None = None,
        sparse: SparseVector | None = None,
    ) -> list[Hit]:
        self._check()
        return self.inner.search(name, vector, top_k, filters, score_threshold, sparse)

    def optimize(self, name: str) -> None:
        self._check()
        self.inner.optimize(name)

    def close(self) -> None:
        self.inner.close()


def doc_spec(space: str = SPACE, dim: int = DIM) -> CollectionSpec:
    return CollectionSpec(
        dim=dim,
        space=space,
        encoder="hash-document",
        encoder_fingerprint="f" * 64,
        keyword_fields=("department",),
        integer_fields=("year",),
        sparse=measure_spec(DOCUMENT_TEXTS),
    )


def build_collection(store: VectorStore, encoder: HashEncoder, spec: CollectionSpec | None = None) -> None:
    """Index DOCS with vectors of their text, so a query equal to a text finds that document first."""
    spec = spec or doc_spec()
    store.create_collection(COLLECTION, spec)
    store.upsert(COLLECTION, _points(spec, encoder))


def _points(spec: CollectionSpec, encoder: HashEncoder | None = None) -> list[DocumentPoint]:
    vectors = (encoder or HashEncoder(spec.space, spec.dim)).encode(DOCUMENT_TEXTS)
    bm25 = Bm25Encoder(spec.sparse) if spec.sparse is not None else None
    return [
        DocumentPoint(
            doc_id=doc_id,
            vector=vector.tolist(),
            title=title,
            text=text,
            metadata={"department": department},
            content_hash=hashlib.sha256(text.encode()).hexdigest(),
            sparse=bm25.document(text) if bm25 is not None else None,
        )
        for (doc_id, (title, text, department)), vector in zip(DOCS.items(), vectors, strict=True)
    ]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings read MEDSEARCH_* from the environment; tests pass everything explicitly.
    for key in [k for k in os.environ if k.startswith("MEDSEARCH_")]:
        monkeypatch.delenv(key)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, collection=COLLECTION, query_model="hash-query")


@pytest.fixture
def store(settings: Settings) -> Iterator[SwitchableStore]:
    edge = open_store(None, settings.store_path)
    build_collection(edge, HashEncoder())
    wrapped = SwitchableStore(edge)
    yield wrapped
    wrapped.close()


@pytest.fixture
def state(settings: Settings, store: SwitchableStore) -> ServingState:
    return ServingState(settings=settings, encoder=HashEncoder(), store=store)


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client for ``app`` with its lifespan entered, as under uvicorn."""
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://medsearch") as client,
    ):
        yield client


@pytest.fixture
async def client(settings: Settings, state: ServingState) -> AsyncIterator[httpx.AsyncClient]:
    async with running(create_app(settings, state)) as c:
        yield c


# --- search -------------------------------------------------------------------------------------


async def test_search_returns_nearest_document_first(client: httpx.AsyncClient) -> None:
    response = await client.post("/search", json={"query": QUERY, "top_k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["hits"]) == 3
    first = body["hits"][0]
    assert first["id"] == "mi"
    assert first["title"] == "Myocardial infarction"
    assert first["metadata"] == {"department": "cardiology"}
    assert first["score"] == pytest.approx(1.0, abs=1e-4)
    assert body["hits"][1]["score"] < first["score"]
    assert body["query_encoder"] == "hash-query"
    assert body["document_encoder"] == "hash-document"
    assert body["space"] == SPACE
    assert body["collection"] == COLLECTION
    assert body["took_ms"] >= 0


async def test_filter_restricts_hits(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/search", json={"query": QUERY, "top_k": 10, "filter": {"department": "neurology"}}
    )
    assert response.status_code == 200, response.text
    assert [h["id"] for h in response.json()["hits"]] == ["migraine"]

    unfiltered = await client.post("/search", json={"query": QUERY, "top_k": 10})
    assert len(unfiltered.json()["hits"]) == len(DOCS)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"query": ""}, "query"),
        ({"query": "   \n\t"}, "query"),
        ({"query": 42}, "query"),
        ({}, "query"),
        ({"query": "x", "top_k": 0}, "top_k"),
        ({"query": "x", "top_k": 101}, "top_k"),
        ({"query": "x", "top_k": "5"}, "top_k"),
        ({"query": "x", "top_k": 2.5}, "top_k"),
        ({"query": "x", "filter": {"department": 3}}, "filter.department"),
        ({"query": "x", "filter": ["department"]}, "filter"),
        ({"query": "x", "limit": 5}, "limit"),
        ({"query": "痛" * 2049}, "query"),
        ({"query": "x", "filter": {f"k{i}": "v" for i in range(17)}}, "filter"),
    ],
)
async def test_invalid_body_is_422_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    response = await client.post("/search", json=body)
    assert response.status_code == 422
    error = response.json()
    assert error["error"] == "invalid_request"
    assert error["message"].startswith(f"{field}: ")
    assert [d["field"] for d in error["details"]] == [field]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "body: malformed JSON at character 1: "),
        (b'{"query": "x",}', "body: malformed JSON at character 14: "),
        (b"", "body: empty; expected a JSON object"),
    ],
)
async def test_malformed_json_is_400_not_a_field_error(
    client: httpx.AsyncClient, raw: bytes, message: str
) -> None:
    response = await client.post("/search", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()
    assert error["error"] == "malformed_json"
    assert error["message"].startswith(message)


async def test_unknown_filter_key_is_422_listing_allowed_fields(client: httpx.AsyncClient) -> None:
    response = await client.post("/search", json={"query": QUERY, "filter": {"department_x": "cardiology"}})
    assert response.status_code == 422
    error = response.json()
    reason = "'department_x' is not a filterable field; declared: ['department', 'year']"
    assert error["message"] == f"filter.department_x: {reason}"
    assert error["details"] == [{"field": "filter.department_x", "message": reason}]


async def test_hybrid_mode_fuses_dense_and_bm25(client: httpx.AsyncClient) -> None:
    # The hash encoder's vectors carry no meaning: only BM25 can find "aura" in the migraine text.
    dense = await client.post("/search", json={"query": "aura", "top_k": 4})
    hybrid = await client.post("/search", json={"query": "aura", "top_k": 4, "mode": "hybrid"})
    assert hybrid.status_code == 200, hybrid.text
    dense_ids = [h["id"] for h in dense.json()["hits"]]
    hits = hybrid.json()["hits"]
    assert hits[0]["id"] == "migraine"
    assert hits[0]["score"] == pytest.approx(1 / 60 + 1 / (60 + dense_ids.index("migraine")), rel=1e-4)
    batch = await client.post("/search/batch", json={"queries": [{"query": "aura", "mode": "hybrid"}]})
    assert batch.json()["results"][0]["hits"][0]["id"] == "migraine"


@pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")
async def test_chunked_documents_come_back_once_with_their_best_chunk(
    settings: Settings, client: httpx.AsyncClient
) -> None:
    whole = (await client.post("/search", json={"query": QUERY})).json()["hits"]
    assert [h["chunk"] for h in whole] == [None] * len(DOCS)  # a whole-document collection
    # The same documents, "mi" now in three chunks of which the 2nd is the query's text.
    spec = doc_spec().model_copy(update={"chunking": ChunkingSpec(max_tokens=32, overlap=4)})
    chunks = {"mi": ["smoker for thirty years", QUERY, "ST elevation on the ECG"]}
    points = [
        p.model_copy(update={"chunk": 0, "chunks": 1})
        if p.doc_id not in chunks
        else p.model_copy(
            update={
                "text": text,
                "vector": HashEncoder().encode([text])[0].tolist(),
                "sparse": Bm25Encoder(spec.sparse).document(text) if spec.sparse else None,
                "chunk": k,
                "chunks": len(chunks[p.doc_id]),
            }
        )
        for p in _points(spec)
        for k, text in enumerate(chunks.get(p.doc_id, [p.text]))
    ]
    server = ServerStore(":memory:")
    server.create_collection(COLLECTION, spec)
    server.upsert(COLLECTION, points)
    state = ServingState(settings=settings, encoder=HashEncoder(), store=server)
    async with running(create_app(settings, state)) as chunked:
        for mode in ("dense", "hybrid"):
            response = await chunked.post("/search", json={"query": QUERY, "top_k": 10, "mode": mode})
            assert response.status_code == 200, response.text
            hits = response.json()["hits"]
            assert sorted(h["id"] for h in hits) == sorted(DOCS)  # each document once
            assert (hits[0]["id"], hits[0]["chunk"], hits[0]["text"]) == ("mi", 1, QUERY)
            assert hits[0]["title"] == "Myocardial infarction"
            assert all(h["chunk"] == 0 for h in hits[1:])
        info = (await chunked.get("/info")).json()
        assert info["collection"]["spec"]["chunking"] == {"max_tokens": 32, "overlap": 4}
        assert info["collection"]["points"] == len(DOCS) + 2  # points are chunks


async def test_hybrid_on_a_dense_only_collection_is_422(settings: Settings, tmp_path: Path) -> None:
    edge = open_store(None, settings.store_path)
    build_collection(edge, HashEncoder(), doc_spec().model_copy(update={"sparse": None}))
    state = ServingState(settings=settings, encoder=HashEncoder(), store=edge)
    async with running(create_app(settings, state)) as client:
        response = await client.post("/search", json={"query": QUERY, "mode": "hybrid"})
        assert response.status_code == 422
        assert response.json()["details"][0]["field"] == "mode"
        assert "--sparse bm25" in response.json()["message"]
        assert (await client.post("/search", json={"query": QUERY, "mode": "dense"})).status_code == 200
        bad = await client.post("/search", json={"query": QUERY, "mode": "sparse"})
        assert bad.status_code == 422 and bad.json()["details"][0]["field"] == "mode"


async def test_filter_with_must_should_must_not(client: httpx.AsyncClient) -> None:
    where = {
        "must_not": [{"key": "department", "match": "cardiology"}],
        "should": [{"key": "department", "any": ["neurology", "dermatology"]}],
    }
    response = await client.post("/search", json={"query": QUERY, "top_k": 10, "filter": where})
    assert response.status_code == 200, response.text
    assert [h["id"] for h in response.json()["hits"]] == ["migraine"]
    only_not = {"must_not": [{"key": "department", "match": "cardiology"}]}
    response = await client.post("/search", json={"query": QUERY, "top_k": 10, "filter": only_not})
    assert sorted(h["id"] for h in response.json()["hits"]) == ["asthma", "migraine"]


@pytest.mark.parametrize(
    ("where", "field", "message"),
    [
        ({"must": [{"key": "year", "range": {"gte": "2020"}}]}, "filter.must.0", "compares with int"),
        ({"should": [{"key": "department", "range": {"gt": 1}}]}, "filter.should.0", "keyword field"),
        ({"must": [{"key": "year"}]}, "filter.must.0", "exactly one of match, any, range"),
        ({"must": [{"key": "year", "match": 1}], "maybe": []}, "filter.maybe", "Extra inputs"),
        ({"must": [{"key": "year", "range": {}}]}, "filter.must.0", "at least one of"),
    ],
)
async def test_filter_the_collection_cannot_apply_is_422_naming_the_condition(
    client: httpx.AsyncClient, where: dict[str, object], field: str, message: str
) -> None:
    response = await client.post("/search", json={"query": QUERY, "filter": where})
    assert response.status_code == 422, response.text
    details = response.json()["details"]
    assert details[0]["field"] == field
    assert message in details[0]["message"]


async def test_body_over_limit_is_413(settings: Settings, state: ServingState) -> None:
    small = settings.model_copy(update={"max_body_bytes": 200})
    async with running(create_app(small, state)) as client:
        oversized = {"query": "x" * 300}
        declared = await client.post("/search", json=oversized)
        assert declared.status_code == 413
        assert declared.json()["error"] == "body_too_large"

        async def chunks() -> AsyncIterator[bytes]:
            # No Content-Length: only counting the received bytes catches this one.
            payload = json.dumps(oversized).encode()
            for start in range(0, len(payload), 64):
                yield payload[start : start + 64]

        streamed = await client.post(
            "/search", content=chunks(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413

        fits = await client.post("/search", json={"query": QUERY})
        assert fits.status_code == 200

        metrics = (await client.get("/metrics")).text
    assert 'medsearch_http_requests_total{route="/search",status="413"} 2.0' in metrics
    assert 'medsearch_errors_total{kind="body_too_large"} 2.0' in metrics


# --- availability -------------------------------------------------------------------------------


async def test_store_outage_is_503_and_recovers(client: httpx.AsyncClient, store: SwitchableStore) -> None:
    assert (await client.get("/readyz")).status_code == 200
    store.down = True

    failed = await client.post("/search", json={"query": QUERY})
    assert failed.status_code == 503
    assert failed.json()["error"] == "store_unavailable"
    assert "simulated" not in failed.text  # internal exception text stays server-side
    not_ready = await client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json() == {"ready": False, "reasons": ["vector store unreachable"]}
    assert (await client.get("/healthz")).status_code == 200

    store.down = False
    assert (await client.get("/readyz")).json() == {"ready": True, "reasons": []}
    recovered = await client.post("/search", json={"query": QUERY})
    assert recovered.status_code == 200
    assert recovered.json()["hits"][0]["id"] == "mi"


async def test_search_store_failure_is_store_unavailable(
    client: httpx.AsyncClient, store: SwitchableStore
) -> None:
    # Warm the spec cache first, so the failure happens in the search call itself.
    assert (await client.post("/search", json={"query": QUERY})).status_code == 200
    store.down = True
    response = await client.post("/search", json={"query": QUERY})
    assert response.status_code == 503
    assert response.json() == {
        "error": "store_unavailable",
        "message": "the vector store is unreachable; retry later",
    }


async def test_store_down_at_start_then_back_checks_compatibility(settings: Settings, tmp_path: Path) -> None:
    edge = open_store(None, tmp_path / "other-store")
    store = SwitchableStore(edge, down=True)
    try:
        state = ServingState(settings=settings, encoder=HashEncoder(), store=store, store_reachable=False)
        async with running(create_app(settings, state)) as client:
            assert (await client.get("/readyz")).status_code == 503
            search = await client.post("/search", json={"query": QUERY})
            assert search.status_code == 503
            assert search.json()["error"] == "store_unavailable"

            # Back, but indexed in another space: still not ready, and the reason names both spaces.
            store.down = False
            build_collection(edge, HashEncoder(space="other-space"), doc_spec(space="other-space"))
            response = await client.get("/readyz")
            assert response.status_code == 503
            (reason,) = response.json()["reasons"]
            assert "'test-space'" in reason
            assert "'other-space'" in reason
            refused = await client.post("/search", json={"query": QUERY})
            assert refused.status_code == 503
            assert refused.json() == {"error": "not_ready", "message": NOT_READY_MESSAGE}
    finally:
        store.close()


async def test_load_state_starts_not_ready_when_store_unreachable(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_query_model(settings)
    monkeypatch.setattr("service.state.load_encoder", lambda _dir, threads=0: HashEncoder())
    # Nothing listens on port 9 on localhost: connection refused at once.
    unreachable = settings.model_copy(update={"qdrant_url": "http://127.0.0.1:9", "qdrant_timeout_s": 1.0})
    state = load_state(unreachable)
    try:
        assert state.spec is None
        assert state.store_reachable is False
        async with running(create_app(unreachable, state)) as client:
            response = await client.get("/readyz")
            assert response.status_code == 503
            assert response.json()["reasons"] == ["vector store unreachable"]
    finally:
        state.close()


class BrokenEncoder(HashEncoder):
    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        if texts != ["warm-up"]:
            raise RuntimeError("onnxruntime failed in /srv/models/secret-path")
        return super().encode(texts, batch_size)


class RefusingStore(SwitchableStore):
    def search(
        self,
        name: str,
        vector: np.ndarray,
        top_k: int,
        filters: FilterLike | None = None,
        score_threshold: float | None = None,
        sparse: SparseVector | None = None,
    ) -> list[Hit]:
        raise StoreError(
            "search 'medsearch': Qdrant answered 400 Bad Request: "
            'b\'{"status":{"error":"Wrong input: 乙肝 in filter"}}\'',
            status=400,
        )


async def test_unexpected_errors_do_not_leak_internal_text(
    settings: Settings, store: SwitchableStore, caplog: pytest.LogCaptureFixture
) -> None:
    state = ServingState(settings=settings, encoder=BrokenEncoder(), store=store)
    app = create_app(settings, state)
    # ServerErrorMiddleware re-raises after answering; the client still gets the 500 body.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://medsearch") as client,
    ):
        response = await client.post("/search", json={"query": QUERY})
    assert response.status_code == 500
    assert response.json() == {"error": "internal_error", "message": "internal error"}

    refusing = ServingState(settings=settings, encoder=HashEncoder(), store=RefusingStore(store.inner))
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        async with running(create_app(settings, refusing)) as client:
            response = await client.post("/search", json={"query": QUERY})
    # Qdrant's answer may echo filter values: the log keeps its status, never its body.
    assert "the store refused a search (HTTP 400)" in caplog.text and "乙肝" not in caplog.text
    assert response.status_code == 502
    assert response.json() == {"error": "store_error", "message": "the vector store refused the request"}
    # The refusal may mean the collection changed (e.g. deleted): its spec is re-read, not trusted.
    assert refusing.spec is None


async def test_searches_back_off_while_the_store_is_down(settings: Settings, store: SwitchableStore) -> None:
    state = ServingState(settings=settings, encoder=HashEncoder(), store=store)
    async with running(create_app(settings, state)) as client:
        store.down = True
        calls = store.calls
        answers = [(await client.post("/search", json={"query": QUERY})).status_code for _ in range(20)]
        assert answers == [503] * 20
        # The first search reaches the store and fails; the next ones answer from the back-off.
        assert store.calls - calls <= 3
        store.down = False
        assert (await client.get("/readyz")).status_code == 200  # a probe ends the back-off
        assert (await client.post("/search", json={"query": QUERY})).status_code == 200


async def test_readyz_opens_the_collection_so_a_locked_shard_is_not_ready(
    settings: Settings, store: SwitchableStore
) -> None:
    store.close()  # the fixture's store would hold the shard itself
    holder = open_store(None, settings.store_path)
    holder.count(COLLECTION)  # another process (the indexer) holds the shard's lock
    served = open_store(None, settings.store_path)
    state = ServingState(settings=settings, encoder=HashEncoder(), store=served)
    try:
        async with running(create_app(settings, state)) as client:
            response = await client.get("/readyz")
            assert response.status_code == 503
            assert response.json()["reasons"] == ["vector store unreachable"]
            assert (await client.post("/search", json={"query": QUERY})).status_code == 503
            holder.close()
            assert (await client.get("/readyz")).status_code == 200
            assert (await client.post("/search", json={"query": QUERY})).status_code == 200
    finally:
        holder.close()
        served.close()


# --- start-up -----------------------------------------------------------------------------------


def write_query_model(settings: Settings, space: str = SPACE) -> Path:
    model_dir = settings.models_path / settings.query_model
    model_dir.mkdir(parents=True)
    (model_dir / "model.onnx").write_bytes(b"placeholder: never loaded by these tests")
    write_manifest(model_dir, query_manifest(space))
    return model_dir


def test_missing_models_dir_names_the_build_command(settings: Settings) -> None:
    with pytest.raises(StartupError, match=r"models directory .* does not exist") as excinfo:
        load_state(settings)
    assert "`medsearch models build`" in str(excinfo.value)


def test_missing_query_model_names_the_build_command(settings: Settings) -> None:
    settings.models_path.mkdir(parents=True)
    with pytest.raises(StartupError, match="query encoder 'hash-query' not found") as excinfo:
        load_state(settings)
    assert "`medsearch models build`" in str(excinfo.value)


def test_missing_collection_names_the_index_command(settings: Settings) -> None:
    write_query_model(settings)
    with pytest.raises(StartupError, match="collection 'medsearch' not found") as excinfo:
        load_state(settings)
    assert "`medsearch index ...`" in str(excinfo.value)


def test_a_document_encoder_is_refused_as_query_encoder_even_in_the_right_space(settings: Settings) -> None:
    model_dir = write_query_model(settings)
    write_manifest(model_dir, query_manifest().model_copy(update={"role": "document"}))
    with pytest.raises(StartupError, match=r"holds a document encoder .* must name a query encoder"):
        load_state(settings)


def test_a_corrupt_model_file_is_a_startup_error_naming_the_fix(tiny_onnx: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_onnx, models / tiny_onnx.name)
    (models / tiny_onnx.name / "model.onnx").write_bytes(b"truncated")
    settings = Settings(home=tmp_path, models_dir=models, query_model=tiny_onnx.name)
    manifest = json.loads((tiny_onnx / "manifest.json").read_text())
    edge = open_store(None, settings.store_path)
    edge.create_collection(
        settings.collection,
        CollectionSpec(
            dim=manifest["dim"], space=manifest["space"], encoder="d", encoder_fingerprint="e" * 64
        ),
    )
    edge.close()
    with pytest.raises(StartupError, match=r"cannot be loaded \(InvalidProtobuf.*rebuild it with"):
        load_state(settings)


def test_an_unreadable_collection_spec_is_a_startup_error(settings: Settings) -> None:
    write_query_model(settings)
    edge = open_store(None, settings.store_path)
    build_collection(edge, HashEncoder())
    edge.close()
    (settings.store_path / COLLECTION / "collection.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(StartupError, match=f"refused to describe collection '{COLLECTION}'"):
        load_state(settings)


def test_space_mismatch_refuses_to_start(settings: Settings) -> None:
    write_query_model(settings, space="query-space")
    edge = open_store(None, settings.store_path)
    build_collection(edge, HashEncoder(space="doc-space"), doc_spec(space="doc-space"))
    edge.close()
    with pytest.raises(StartupError, match="refusing to serve") as excinfo:
        load_state(settings)
    assert "'query-space'" in str(excinfo.value)
    assert "'doc-space'" in str(excinfo.value)


def test_serve_exits_2_with_the_message_on_stderr(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert serve(settings) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err
    assert "`medsearch models build`" in err


async def test_real_onnx_encoder_serves_through_lifespan(tiny_onnx: Path, tmp_path: Path) -> None:
    """load_state -> lifespan (warm-up) -> search with the real ONNX runtime and the embedded store."""
    settings = Settings(home=tmp_path, models_dir=tiny_onnx.parent, query_model=tiny_onnx.name)
    encoder_manifest = json.loads((tiny_onnx / "manifest.json").read_text())
    edge = open_store(None, settings.store_path)
    edge.create_collection(
        settings.collection,
        CollectionSpec(
            dim=encoder_manifest["dim"],
            space=encoder_manifest["space"],
            encoder="tiny-doc",
            encoder_fingerprint="e" * 64,
        ),
    )
    rng = np.random.default_rng(0)
    edge.upsert(
        settings.collection,
        [
            DocumentPoint(
                doc_id=f"d{i}",
                vector=rng.standard_normal(encoder_manifest["dim"]).tolist(),
                text=f"doc {i}",
                content_hash=str(i),
            )
            for i in range(3)
        ],
    )
    edge.close()

    async with running(create_app(settings)) as client:
        assert (await client.get("/readyz")).json() == {"ready": True, "reasons": []}
        # Far beyond the tiny encoder's token limit (within the 2,048-char cap): truncated, not refused.
        response = await client.post("/search", json={"query": "chest pain " * 180, "top_k": 2})
        assert response.status_code == 200, response.text
        assert len(response.json()["hits"]) == 2
        assert response.json()["query_encoder"] == encoder_manifest["name"]


# --- ops endpoints ------------------------------------------------------------------------------


async def test_info_exposes_encoder_collection_and_pairing(client: httpx.AsyncClient) -> None:
    response = await client.get("/info")
    assert response.status_code == 200
    info = response.json()
    assert info["query_encoder"] == {
        "name": "hash-query",
        "space": SPACE,
        "fingerprint": "0" * 64,
        "quantization": "int8",
        "dim": DIM,
        "max_tokens": 32,
        "card": "",
        "figures": {},
    }
    assert info["collection"]["name"] == COLLECTION
    assert info["collection"]["points"] == len(DOCS)
    assert info["collection"]["spec"]["encoder"] == "hash-document"
    assert info["collection"]["spec"]["keyword_fields"] == ["department"]
    assert "'hash-document'" in info["pairing_note"]
    assert "'hash-query'" in info["pairing_note"]


def test_pairing_note_says_asymmetric_and_reports_the_card_figures() -> None:
    from service.routes.health import pairing, pairing_note

    manifest = query_manifest().model_copy(
        update={"card": "models/cards/x.md", "figures": {"cmedqa-im dev nDCG@10": 27.5}}
    )
    assert pairing(manifest, doc_spec()) == "asymmetric"
    note = pairing_note(manifest, doc_spec())
    assert "Asymmetric pair" in note
    assert "cmedqa-im dev nDCG@10 27.5" in note and "models/cards/x.md" in note
    symmetric = manifest.model_copy(update={"derived_from": "f" * 64, "figures": {}})
    assert "Symmetric pair" in pairing_note(symmetric, doc_spec())
    assert "Measured" not in pairing_note(symmetric, doc_spec())


async def test_metrics_count_requests_by_route_and_status(client: httpx.AsyncClient) -> None:
    await client.post("/search", json={"query": QUERY})
    await client.post("/search", json={"query": ""})
    await client.get("/no-such-page")
    text = (await client.get("/metrics")).text
    assert 'medsearch_http_requests_total{route="/search",status="200"} 1.0' in text
    assert 'medsearch_http_requests_total{route="/search",status="422"} 1.0' in text
    assert 'medsearch_http_requests_total{route="unmatched",status="404"} 1.0' in text
    assert 'medsearch_errors_total{kind="invalid_request"} 1.0' in text
    assert "medsearch_encode_duration_seconds_count 1.0" in text
    assert "medsearch_search_duration_seconds_count 1.0" in text
    # The stages of the one successful search (the 422 never reached its handler).
    assert "medsearch_request_validate_duration_seconds_count 1.0" in text
    assert "medsearch_encode_queue_wait_seconds_count 1.0" in text
    assert "medsearch_response_serialize_duration_seconds_count 1.0" in text


async def test_metrics_registries_are_per_app(settings: Settings, state: ServingState) -> None:
    one_search = 'medsearch_http_requests_total{route="/search",status="200"} 1.0'
    async with running(create_app(settings, state)) as first:
        await first.post("/search", json={"query": QUERY})
        first_text = (await first.get("/metrics")).text
    async with running(create_app(settings, state)) as second:
        before = (await second.get("/metrics")).text
        await second.post("/search", json={"query": QUERY})
        after = (await second.get("/metrics")).text
    assert one_search in first_text
    assert 'route="/search"' not in before  # the first app's search is not in the second's registry
    assert one_search in after  # its own search counts once, not on top of the first app's
    assert "medsearch_search_duration_seconds_count 1.0" in after


@pytest.mark.parametrize("log_queries", [False, True])
async def test_query_text_is_logged_only_when_enabled(
    settings: Settings, state: ServingState, caplog: pytest.LogCaptureFixture, log_queries: bool
) -> None:
    configured = settings.model_copy(update={"log_queries": log_queries})
    state.settings = configured
    secret = "patient Jane Roe 1970-01-01 HIV positive"
    with caplog.at_level(logging.DEBUG):
        async with running(create_app(configured, state)) as client:
            assert (await client.post("/search", json={"query": secret})).status_code == 200
            assert (await client.post("/search", json={"query": secret, "top_k": 0})).status_code == 422
    # httpx logs every request too, so only the service's own records prove the route logged.
    ours = [r for r in caplog.records if r.name == "medsearch.service"]
    assert any("search" in r.getMessage() for r in ours), "the search route logs at DEBUG either way"
    assert (secret in caplog.text) is log_queries


# --- OpenAPI contract ---------------------------------------------------------------------------


def live_openapi() -> dict[str, Any]:
    return create_app(Settings(home=Path("unused"))).openapi()


def write_openapi() -> None:
    OPENAPI_SNAPSHOT.write_text(json.dumps(live_openapi(), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def test_openapi_matches_snapshot() -> None:
    assert OPENAPI_SNAPSHOT.is_file(), f"{OPENAPI_SNAPSHOT} missing; {REGENERATE}"
    snapshot = json.loads(OPENAPI_SNAPSHOT.read_text(encoding="utf-8"))
    assert live_openapi() == snapshot, f"the HTTP contract changed; review, then {REGENERATE}"


def test_openapi_declares_the_limits() -> None:
    schema = live_openapi()["components"]["schemas"]["SearchRequest"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["top_k"]["minimum"] == 1
    assert schema["properties"]["top_k"]["maximum"] == 100
    assert schema["properties"]["query"]["minLength"] == 1
    assert "truncated" in schema["properties"]["query"]["description"]


# --- request ids and the access log -------------------------------------------------------------


async def test_every_response_carries_a_request_id(client: httpx.AsyncClient) -> None:
    generated = await client.post("/search", json={"query": QUERY})
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
    given = await client.get("/healthz", headers={"X-Request-ID": "gateway-42.a:b"})
    assert given.headers["x-request-id"] == "gateway-42.a:b"
    unsafe = {"X-Request-ID": "a b;X-Evil: 1", "content-type": "application/json"}
    refused = await client.post("/search", content=b"{", headers=unsafe)
    assert refused.status_code == 400  # errors get ids too; an unsafe id is replaced, not echoed
    assert re.fullmatch(r"[0-9a-f]{32}", refused.headers["x-request-id"])


async def test_access_log_has_id_route_status_latency_and_never_the_query(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "patient Jane Roe HIV positive"
    with caplog.at_level(logging.INFO, logger="medsearch.access"):
        response = await client.post("/search?q=" + secret, json={"query": secret})
    records = [r for r in caplog.records if r.name == "medsearch.access"]
    assert len(records) == 1
    entry = json.loads(JsonFormatter().format(records[0]))
    assert entry["request_id"] == response.headers["x-request-id"]
    assert (entry["method"], entry["route"], entry["status"]) == ("POST", "/search", 200)
    assert entry["latency_ms"] > 0
    assert secret not in caplog.text and "Jane" not in json.dumps(entry)


# --- API keys -----------------------------------------------------------------------------------

SEARCH_KEY = "search-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"api_keys": SecretStr(f"search:{SEARCH_KEY},admin:{ADMIN_KEY}"), "protect_metrics": True}
    )


async def test_api_keys_gate_search_and_scope_metrics(
    keyed: Settings, state: ServingState, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        async with running(create_app(keyed, state)) as client:
            missing = await client.post("/search", json={"query": QUERY})
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"] == "Bearer"
            assert missing.json()["error"] == "unauthorized"
            wrong = await client.post("/search", json={"query": QUERY}, headers=bearer(SEARCH_KEY + "x"))
            assert (wrong.status_code, wrong.json()["message"]) == (401, "invalid API key")
            assert (await client.get("/info")).status_code == 401

            ok = await client.post("/search", json={"query": QUERY}, headers=bearer(SEARCH_KEY))
            assert ok.status_code == 200
            assert (await client.get("/info", headers=bearer(SEARCH_KEY))).status_code == 200
            scoped = await client.get("/metrics", headers=bearer(SEARCH_KEY))
            assert (scoped.status_code, scoped.json()["error"]) == (403, "forbidden")
            assert (await client.get("/metrics", headers=bearer(ADMIN_KEY))).status_code == 200
            assert (await client.post("/search", json={"query": QUERY}, headers=bearer(ADMIN_KEY))).is_success
            # Probes stay open for orchestrators.
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
    assert SEARCH_KEY not in caplog.text and ADMIN_KEY not in caplog.text


async def test_metrics_are_open_unless_protected(settings: Settings, state: ServingState) -> None:
    open_metrics = settings.model_copy(update={"api_keys": SecretStr(f"search:{SEARCH_KEY}")})
    async with running(create_app(open_metrics, state)) as client:
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.post("/search", json={"query": QUERY})).status_code == 401


def test_api_key_file_errors_name_file_and_line_never_the_key(settings: Settings, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# ops keys\nsearch:{SEARCH_KEY}\n\nreader:{ADMIN_KEY}\n", encoding="utf-8")
    with pytest.raises(ApiKeyError, match=rf"^{re.escape(str(keys))}:4: expected 'scope:key'") as excinfo:
        create_app(settings.model_copy(update={"api_keys_file": keys}))
    assert ADMIN_KEY not in str(excinfo.value)
    keys.write_text("search:short\n", encoding="utf-8")
    with pytest.raises(ApiKeyError, match=r":1: key shorter than 16 characters"):
        create_app(settings.model_copy(update={"api_keys_file": keys}))
    with pytest.raises(ApiKeyError, match="cannot read the API key file"):
        create_app(settings.model_copy(update={"api_keys_file": tmp_path / "absent"}))
    with pytest.raises(ApiKeyError, match="PROTECT_METRICS is on but no API key"):
        create_app(settings.model_copy(update={"protect_metrics": True}))


async def test_keys_from_a_file_work(settings: Settings, state: ServingState, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"search:{SEARCH_KEY}\n", encoding="utf-8")
    async with running(create_app(settings.model_copy(update={"api_keys_file": keys}), state)) as client:
        assert (await client.post("/search", json={"query": QUERY}, headers=bearer(SEARCH_KEY))).is_success
        assert (await client.post("/search", json={"query": QUERY})).status_code == 401


async def test_cors_is_off_unless_origins_are_configured(settings: Settings, state: ServingState) -> None:
    preflight = {"Origin": "https://ehr.example", "Access-Control-Request-Method": "POST"}
    async with running(create_app(settings, state)) as client:
        response = await client.options("/search", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    allowed = settings.model_copy(update={"cors_origins": ["https://ehr.example"]})
    async with running(create_app(allowed, state)) as client:
        response = await client.options("/search", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://ehr.example"
        other = await client.options("/search", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# --- /v1, batch search, embed -------------------------------------------------------------------


async def test_v1_prefix_serves_the_same_routes(client: httpx.AsyncClient) -> None:
    versioned = await client.post("/v1/search", json={"query": QUERY, "top_k": 2})
    alias = await client.post("/search", json={"query": QUERY, "top_k": 2})
    assert versioned.status_code == alias.status_code == 200
    assert [h["id"] for h in versioned.json()["hits"]] == [h["id"] for h in alias.json()["hits"]]
    for path in ("/v1/healthz", "/v1/readyz", "/v1/info", "/v1/metrics"):
        assert (await client.get(path)).status_code == 200, path
    metrics = (await client.get("/metrics")).text
    assert 'route="/v1/search"' in metrics and 'route="/search"' in metrics


async def test_batch_search_answers_each_query_in_order(client: httpx.AsyncClient) -> None:
    queries = [{"query": QUERY, "top_k": 1}, {"query": "other question", "top_k": 3}]
    response = await client.post("/v1/search/batch", json={"queries": queries})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [len(r["hits"]) for r in results] == [1, 3]
    for query, result in zip(queries, results, strict=True):
        single = (await client.post("/search", json=query)).json()
        assert [h["id"] for h in result["hits"]] == [h["id"] for h in single["hits"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"queries": []}, "queries"),
        ({"queries": [{"query": "x"}] * 33}, "queries"),
        ({"queries": [{"query": "x"}, {"query": ""}]}, "queries.1.query"),
        ({"queries": [{"query": "x", "filter": {"nope": "v"}}]}, "filter.nope"),
    ],
)
async def test_batch_search_refuses_the_whole_call_naming_the_query(
    client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    response = await client.post("/search/batch", json=body)
    assert response.status_code == 422
    assert response.json()["details"][0]["field"] == field


async def test_embed_returns_the_query_encoders_vectors_with_their_space(
    client: httpx.AsyncClient,
) -> None:
    texts = ["糖尿病人能吃西瓜吗", "headache"]
    response = await client.post("/v1/embed", json={"texts": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["space"], body["encoder"], body["dim"]) == (SPACE, "hash-query", DIM)
    np.testing.assert_allclose(np.asarray(body["vectors"]), HashEncoder().encode(texts), atol=1e-6)
    assert (await client.post("/embed", json={"texts": ["x"] * 33})).status_code == 422


class NaNEncoder(HashEncoder):
    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return np.full((len(texts), self.manifest.dim), np.nan, dtype=np.float32)


async def test_a_nan_query_vector_is_an_encoder_error_not_the_stores(
    settings: Settings, store: SwitchableStore
) -> None:
    state = ServingState(settings=settings, encoder=NaNEncoder(), store=store)
    async with running(create_app(settings, state)) as client:
        response = await client.post("/search", json={"query": QUERY})
    assert response.status_code == 500
    assert response.json() == {
        "error": "encoder_error",
        "message": "the query encoder produced a non-finite vector",
    }


# --- under load ---------------------------------------------------------------------------------


class GatedEncoder(HashEncoder):
    """Blocks every encode until ``gate`` opens (or ``wait_s`` passes)."""

    def __init__(self, wait_s: float = 5.0) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.wait_s = wait_s

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        self.gate.wait(self.wait_s)
        return super().encode(texts, batch_size)


async def test_over_capacity_is_429_with_retry_after(settings: Settings, store: SwitchableStore) -> None:
    encoder = GatedEncoder()
    encoder.gate.set()  # the warm-up passes
    small = settings.model_copy(update={"queue_max_pending": 2, "batch_max_wait_ms": 0})
    state = ServingState(settings=small, encoder=encoder, store=store)
    app = create_app(small, state)
    async with running(app) as client:
        encoder.gate.clear()  # from now on the encoder holds every run
        held = [asyncio.ensure_future(client.post("/search", json={"query": f"q{i}"})) for i in range(2)]
        for _ in range(500):
            if app.state.batcher.pending == 2:
                break
            await asyncio.sleep(0.01)
        refused = await client.post("/search", json={"query": "one more"})
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"] == "overloaded"
        assert (await client.get("/healthz")).status_code == 200  # probes do not queue behind encodes
        encoder.gate.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
        metrics = (await client.get("/metrics")).text
        assert 'medsearch_errors_total{kind="overloaded"} 1.0' in metrics


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/search", {"query": "slow"}),
        ("/search/batch", {"queries": [{"query": "slow"}]}),
        ("/embed", {"texts": ["slow"]}),
    ],
)
async def test_a_request_past_its_deadline_is_504_on_every_route(
    settings: Settings,
    store: SwitchableStore,
    caplog: pytest.LogCaptureFixture,
    path: str,
    body: dict[str, Any],
) -> None:
    encoder = GatedEncoder(wait_s=0.5)
    tight = settings.model_copy(update={"request_timeout_s": 0.1})
    state = ServingState(settings=tight, encoder=encoder, store=store)
    app = create_app(tight, state)
    async with running(app) as client:
        with caplog.at_level(logging.ERROR, logger="medsearch.service"):
            response = await client.post(path, json=body)
        metrics = (await client.get("/metrics")).text
    # A late answer is load, not a fault worth an error and a traceback in the log.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert response.status_code == 504
    assert response.json() == {
        "error": "deadline_exceeded",
        "message": "the request did not finish within the service's deadline",
    }
    # The documented body: what /openapi.json promises for a 504 on this route.
    documented = app.openapi()["paths"][path]["post"]["responses"]["504"]
    assert documented["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert 'medsearch_errors_total{kind="deadline_exceeded"} 1.0' in metrics


async def test_repeated_query_is_served_from_the_cache(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        assert (await client.post("/search", json={"query": QUERY})).status_code == 200
    metrics = (await client.get("/metrics")).text
    assert "medsearch_query_cache_hits_total 2.0" in metrics
    assert "medsearch_query_cache_misses_total 1.0" in metrics


# --- score threshold, with_text, /collections ---------------------------------------------------


async def test_score_threshold_drops_weaker_hits(client: httpx.AsyncClient) -> None:
    everything = (await client.post("/search", json={"query": QUERY, "top_k": 5})).json()["hits"]
    cut = (everything[0]["score"] + everything[-1]["score"]) / 2
    kept = (await client.post("/search", json={"query": QUERY, "top_k": 5, "score_threshold": cut})).json()
    assert [h["id"] for h in kept["hits"]] == [h["id"] for h in everything if h["score"] >= cut]
    assert 0 < len(kept["hits"]) < len(everything)
    assert (await client.post("/search", json={"query": QUERY, "score_threshold": 1.5})).status_code == 422


async def test_with_text_false_returns_ids_and_scores_only(client: httpx.AsyncClient) -> None:
    full = (await client.post("/search", json={"query": QUERY, "top_k": 2})).json()["hits"]
    bare = (await client.post("/search", json={"query": QUERY, "top_k": 2, "with_text": False})).json()[
        "hits"
    ]
    assert [(h["id"], h["score"]) for h in bare] == [(h["id"], h["score"]) for h in full]
    assert all(h["title"] is None and h["text"] is None for h in bare)
    assert all(h["text"] for h in full)


async def test_collections_lists_the_served_collection(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/collections")).json()
    assert body["served"] == COLLECTION
    [served] = body["collections"]
    assert (served["name"], served["spec"]["space"], served["points"]) == (COLLECTION, SPACE, len(DOCS))


async def test_a_client_leaving_mid_body_is_not_counted_as_a_server_error(
    settings: Settings, state: ServingState
) -> None:
    app = create_app(settings, state)
    messages = iter(
        [
            {"type": "http.request", "body": b'{"query": "che', "more_body": True},
            {"type": "http.disconnect"},
        ]
    )
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/search",
        "raw_path": b"/search",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"40")],
        "root_path": "",
        "scheme": "http",
        "server": ("t", 80),
        "client": ("c", 1),
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
    }
    async with running(app) as client:
        await app(scope, receive, send)
        metrics = (await client.get("/metrics")).text
    assert not any(m["type"] == "http.response.start" for m in sent)
    assert 'medsearch_http_requests_total{route="/search",status="499"} 1.0' in metrics
    assert 'status="500"' not in metrics


def _has_cjk(value: object) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in json.dumps(value, ensure_ascii=False))


def _has_latin_words(value: object, at_least: int = 1) -> bool:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    words = [w for w in text.replace('"', " ").split() if len(w) > 2 and w.isascii() and w.isalpha()]
    return len(words) >= at_least


def _refers_to_a_model(prop: dict[str, Any]) -> bool:
    options = prop.get("anyOf", [prop])
    kinds = [o.get("items", o) for o in options if o.get("type") != "null"]
    return bool(kinds) and all("$ref" in k for k in kinds)


def test_openapi_describes_every_field_with_examples_in_chinese_and_english() -> None:
    """Every property of every body has a description and examples; those holding text (strings,
    or objects and lists of them) have a Chinese and an English example."""
    schemas = live_openapi()["components"]["schemas"]
    missing = []
    for model, schema in schemas.items():
        if model in {"HTTPValidationError", "ValidationError"}:
            continue  # FastAPI's own, never returned (every error uses ErrorResponse)
        for name, prop in schema.get("properties", {}).items():
            where = f"{model}.{name}"
            if not prop.get("description"):
                missing.append(f"{where}: no description")
            if _refers_to_a_model(prop):
                continue  # described field by field in its own schema
            examples = prop.get("examples")
            if not examples:
                missing.append(f"{where}: no examples")
                continue
            # Prose (Chinese, or several English words) must come in both languages; identifiers need not.
            # Server-written English (x-language: en) is exempt.
            prose = [e for e in examples if _has_cjk(e) or _has_latin_words(e, at_least=2)]
            bilingual = any(map(_has_cjk, examples)) and any(map(_has_latin_words, examples))
            if prose and not bilingual and prop.get("x-language") != "en":
                missing.append(f"{where}: needs a Chinese and an English example")
    assert missing == []


# --- hot reload -----------------------------------------------------------------------------------


def _alias(store: ServerStore, alias: str, collection: str) -> None:
    from qdrant_client import models

    store._client.update_collection_aliases(  # the reindex job's switch, as a Qdrant server does it
        change_aliases_operations=[
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)
            )
        ]
    )


async def test_alias_switch_is_picked_up_without_dropping_requests(settings: Settings) -> None:
    server = ServerStore(":memory:")
    blue, green = "medsearch-v1", "medsearch-v2"
    for name, fingerprint in ((blue, "b" * 64), (green, "c" * 64)):
        spec = doc_spec().model_copy(update={"encoder_fingerprint": fingerprint})
        server.create_collection(name, spec)
        server.upsert(name, [p.model_copy(update={"doc_id": f"{name}:{p.doc_id}"}) for p in _points(spec)])
    _alias(server, COLLECTION, blue)
    state = ServingState(settings=settings, encoder=HashEncoder(), store=server)
    fast = settings.model_copy(update={"spec_refresh_s": 0.05})
    statuses: list[int] = []
    async with running(create_app(fast, state)) as client:

        async def search() -> str:
            response = await client.post("/search", json={"query": QUERY, "top_k": 1})
            statuses.append(response.status_code)
            return str(response.json()["hits"][0]["id"]) if response.status_code == 200 else ""

        assert (await search()).startswith(blue)
        _alias(server, COLLECTION, green)
        seen = [await search() for _ in range(20)]
        await asyncio.sleep(0.2)
        info = (await client.get("/info")).json()
        assert info["collection"]["spec"]["encoder_fingerprint"] == "c" * 64
        assert seen[-1].startswith(green)
    assert statuses == [200] * len(statuses)


async def test_alias_moved_to_another_space_stops_serving(settings: Settings) -> None:
    server = ServerStore(":memory:")
    server.create_collection("same", doc_spec())
    server.upsert("same", _points(doc_spec()))
    other = doc_spec(space="other-space")
    server.create_collection("other", other)
    _alias(server, COLLECTION, "same")
    state = ServingState(settings=settings, encoder=HashEncoder(), store=server)
    fast = settings.model_copy(update={"spec_refresh_s": 0.05})
    async with running(create_app(fast, state)) as client:
        assert (await client.post("/search", json={"query": QUERY})).status_code == 200
        _alias(server, COLLECTION, "other")
        await asyncio.sleep(0.3)
        refused = await client.post("/search", json={"query": QUERY})
        assert refused.status_code == 503 and refused.json()["message"] == NOT_READY_MESSAGE
        assert "'other-space'" in (await client.get("/readyz")).json()["reasons"][0]


async def test_lifespan_start_up_failure_is_the_same_one_line_as_serve(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings)  # no models built in this home
    with pytest.raises(StartupError) as info, caplog.at_level(logging.ERROR, logger="medsearch.service"):
        async with app.router.lifespan_context(app):
            pass
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "medsearch.service"]
    assert [r.getMessage() for r in errors] == [f"cannot start: {info.value}"]
    assert "medsearch models build" in str(info.value)


async def test_a_short_form_filter_key_out_of_bounds_is_a_422_naming_the_filter(
    client: httpx.AsyncClient,
) -> None:
    for key in ("", "k" * 129):
        response = await client.post("/search", json={"query": QUERY, "filter": {key: "x"}})
        assert response.status_code == 422, response.text
        assert response.json()["details"][0]["field"] == "filter"


async def test_every_route_but_the_probes_needs_a_key_of_its_scope(
    keyed: Settings, state: ServingState
) -> None:
    """Walks the served OpenAPI, so a route added later is covered without touching this test."""
    open_routes = {"/healthz", "/readyz", "/v1/healthz", "/v1/readyz"}
    bodies = {
        "search": {"query": QUERY},
        "batch": {"queries": [{"query": QUERY}]},
        "embed": {"texts": [QUERY]},
    }
    async with running(create_app(keyed, state)) as client:
        spec = (await client.get("/openapi.json")).json()
        checked = 0
        for path, operations in spec["paths"].items():
            if path in open_routes:
                continue
            for method in operations:
                body = next((b for name, b in bodies.items() if path.endswith(name)), None)

                async def call(
                    key: str | None, path: str = path, method: str = method, body=body
                ) -> httpx.Response:
                    headers = bearer(key) if key else {}
                    return await client.request(method, path, json=body, headers=headers)

                assert (await call(None)).status_code == 401, path
                assert (await call(ADMIN_KEY[:-1] + "x")).status_code == 401, path
                scoped = await call(SEARCH_KEY)
                admin = await call(ADMIN_KEY)
                assert admin.status_code == 200, (path, admin.text)
                expected = 403 if path.endswith("/metrics") else 200
                assert scoped.status_code == expected, (path, scoped.text)
                checked += 1
    assert checked >= 12
