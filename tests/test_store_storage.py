"""How a collection stores its vectors (CollectionSpec.storage): int8 quantization and on-disk originals.

Each test would fail if the option were ignored somewhere on its way: the spec, the engine's own
config, the search parameters (rescoring), the refusal of an existing collection stored otherwise,
the indexer's flags and the version identity of collections built before the option existed.

The engine builds its graph and its quantized copy only for segments over its indexing threshold
(10,000 KB of vectors); 700 vectors of 4,096 dimensions pass it in a fraction of a second, where
EmbeddingGemma's 768 dimensions would need thousands of vectors and seconds of graph building.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer.build import ExitCode, RunOptions, full_build, incremental
from indexer.planning import StorageChoice
from indexer.versions import served
from store import edge, server
from store.base import DocumentPoint, VectorStore
from store.edge import SHARD_DIR, EdgeStore
from store.errors import StoreError
from store.factory import open_store
from store.qdrant import INT8_OVERSAMPLING
from store.server import ServerStore
from store.spec import CollectionSpec, VectorStorage
from tests.test_index_build import ALIAS, HashDocuments, corpus

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")

WIDE = 4096  # over the engine's indexing threshold with a few hundred points
POINTS = 700
NAME = "docs"
INT8 = VectorStorage(quantization="int8")
INT8_ON_DISK = VectorStorage(quantization="int8", on_disk=True)


def spec(dim: int = 16, storage: VectorStorage | None = None) -> CollectionSpec:
    return CollectionSpec(
        dim=dim,
        space="test-space",
        encoder="tiny-doc",
        encoder_fingerprint="fp-1",
        storage=storage or VectorStorage(),
    )


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def points_of(vectors: np.ndarray) -> list[DocumentPoint]:
    return [
        DocumentPoint(doc_id=f"d{i}", vector=row.tolist(), text=f"正文 {i}", content_hash=f"h{i}")
        for i, row in enumerate(vectors)
    ]


def test_a_spec_written_before_storage_reads_as_float32_in_ram_and_keeps_its_identity() -> None:
    old = json.loads(spec().model_dump_json())
    del old["storage"]
    assert CollectionSpec.model_validate(old).storage == VectorStorage()
    # The version name of a build is a digest of this JSON: unchanged for specs from before storage.
    assert json.loads(spec().identity_json()) == old
    assert json.loads(spec(storage=INT8).identity_json())["storage"]["quantization"] == "int8"


def test_edge_builds_int8_pinned_and_originals_on_disk_and_searches_with_rescoring(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    vectors = unit_rows(rng, POINTS, WIDE)
    store = EdgeStore(tmp_path / "qdrant", hnsw_ef=128)
    store.create_collection(NAME, spec(WIDE, INT8_ON_DISK))
    store.upsert(NAME, points_of(vectors))
    store.optimize(NAME)

    shard = tmp_path / "qdrant" / NAME / SHARD_DIR
    config = json.loads((shard / "edge_config.json").read_text(encoding="utf-8"))
    assert config["quantization_config"]["scalar"]["type"] == "int8"
    assert config["quantization_config"]["scalar"]["memory"] == "pinned"
    assert config["vectors"][""]["memory"] == "cold"
    assert list(shard.glob("segments/*/vector_storage/quantized.data")), "no quantized copy was built"

    # Near-duplicates of stored vectors, so the true top 10 is well separated.
    queries = vectors[:40] + 0.5 * unit_rows(rng, 40, WIDE)
    exact = (vectors @ (queries / np.linalg.norm(queries, axis=1, keepdims=True)).T).T
    found = 0
    for query, scores in zip(queries, exact, strict=True):
        hits = store.search(NAME, query, 10)
        truth = np.argsort(-scores)[:10]
        found += len({h.doc_id for h in hits} & {f"d{i}" for i in truth})
        # Rescored with the originals: each hit's score is its float32 cosine, not an int8
        # approximation of it (compared per hit: HNSW may miss a true neighbour, rescoring may not).
        np.testing.assert_allclose(
            [h.score for h in hits], scores[[int(h.doc_id[1:]) for h in hits]], atol=1e-4
        )
    assert found / (10 * len(queries)) >= 0.9
    store.close()

    reopened = EdgeStore(tmp_path / "qdrant")
    assert reopened.get_collection(NAME) == spec(WIDE, INT8_ON_DISK)
    assert len(reopened.search(NAME, queries[0], 10)) == 10
    reopened.close()


def test_edge_search_parameters_follow_the_spec() -> None:
    plain = edge.search_params(64, VectorStorage())
    assert (plain.hnsw_ef, plain.quantization) == (64, None)
    quantized = edge.search_params(64, INT8).quantization
    assert quantized is not None
    assert (quantized.rescore, quantized.oversampling, quantized.ignore) == (True, INT8_OVERSAMPLING, False)


def test_a_default_collection_is_built_as_before(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "qdrant")
    store.create_collection(NAME, spec())
    config = json.loads(
        (tmp_path / "qdrant" / NAME / SHARD_DIR / "edge_config.json").read_text(encoding="utf-8")
    )
    assert "quantization_config" not in config and "memory" not in config["vectors"][""]
    store.close()


class _Recording:
    """qdrant-client with its create_collection and query_points arguments recorded."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.created: dict[str, Any] = {}
        self.queried: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def create_collection(self, name: str, **kwargs: Any) -> bool:
        self.created = kwargs
        return bool(self.real.create_collection(name, **kwargs))

    def query_points(self, name: str, **kwargs: Any) -> Any:
        self.queried.append(kwargs)
        return self.real.query_points(name, **kwargs)


def test_server_creates_int8_always_ram_and_on_disk_and_searches_with_rescoring(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qdrant_client import models

    store = ServerStore(":memory:")
    recording = _Recording(store._client)
    monkeypatch.setattr(store, "_client", recording)
    store.create_collection(NAME, spec(16, INT8_ON_DISK))
    assert recording.created["quantization_config"] == models.ScalarQuantization(
        scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, quantile=0.99, always_ram=True)
    )
    assert recording.real.get_collection(NAME).config.params.vectors.on_disk is True
    assert store.get_collection(NAME) == spec(16, INT8_ON_DISK)

    # A real server gets search parameters (local mode, brute force already, gets none).
    monkeypatch.setattr(store, "_hnsw_ef", 64)
    store.upsert(NAME, points_of(unit_rows(np.random.default_rng(1), 20, 16)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # local mode: "search_params has no effect"
        store.search(NAME, np.ones(16, dtype=np.float32), 5)
    sent = recording.queried[-1]["search_params"]
    assert sent == server.search_params(64, INT8)
    assert sent.quantization == models.QuantizationSearchParams(rescore=True, oversampling=INT8_OVERSAMPLING)
    store.close()


@pytest.mark.parametrize("backend", ["edge", "server"])
def test_an_existing_collection_stored_otherwise_is_refused_with_the_way_out(
    backend: str, tmp_path: Path
) -> None:
    store = open_store(None if backend == "edge" else ":memory:", tmp_path / "qdrant")
    store.create_collection(NAME, spec())
    with pytest.raises(StoreError, match=r"storage: stored .*'quantization': None.*fixed when it is created"):
        store.create_collection(NAME, spec(storage=INT8))
    assert store.get_collection(NAME) == spec()
    store.close()


@pytest.fixture
def edge_store(tmp_path: Path) -> Any:
    store = open_store(None, tmp_path / "qdrant")
    yield store
    store.close()


def test_index_flags_build_a_quantized_version_that_later_builds_keep(
    tmp_path: Path, edge_store: VectorStore
) -> None:
    encoder = HashDocuments()
    first = full_build([corpus(tmp_path / "a.jsonl", 30)], encoder, edge_store, ALIAS, RunOptions(keep=3))
    plain = edge_store.get_collection(first.collection)
    assert plain is not None and plain.storage == VectorStorage()

    int8 = RunOptions(keep=3, storage=StorageChoice(quantization="int8", on_disk=True))
    second = full_build([tmp_path / "a.jsonl"], encoder, edge_store, ALIAS, int8)
    # Same input, another storage: another build, switched to once validated.
    assert (second.exit_code, second.switched) == (ExitCode.OK, True)
    assert second.collection != first.collection == second.switched_from
    assert edge_store.get_collection(ALIAS) == plain.model_copy(update={"storage": INT8_ON_DISK})

    # Without the flags, the next build keeps the served version's storage (here: the same build).
    again = full_build([tmp_path / "a.jsonl"], encoder, edge_store, ALIAS, RunOptions(keep=3))
    assert (again.collection, again.up_to_date) == (second.collection, True)
    off = RunOptions(keep=3, storage=StorageChoice(quantization="none", on_disk=False))
    third = full_build([tmp_path / "a.jsonl"], encoder, edge_store, ALIAS, off)
    assert third.switched and edge_store.get_collection(ALIAS) == plain


def test_an_incremental_run_cannot_change_the_storage(tmp_path: Path, edge_store: VectorStore) -> None:
    encoder = HashDocuments()
    built = full_build([corpus(tmp_path / "a.jsonl", 20)], encoder, edge_store, ALIAS, RunOptions())
    assert built.switched
    asked = RunOptions(storage=StorageChoice(quantization="int8"))
    refused = incremental([corpus(tmp_path / "b.jsonl", 22)], encoder, edge_store, ALIAS, asked)
    assert refused.exit_code == ExitCode.REFUSED and refused.indexed == 0
    assert refused.error is not None
    assert "int8 vectors" in refused.error and "run a full build" in refused.error
    kept = incremental([tmp_path / "b.jsonl"], encoder, edge_store, ALIAS, RunOptions())
    assert (kept.exit_code, kept.indexed) == (ExitCode.OK, 2)
    assert served(edge_store, ALIAS) == built.collection
