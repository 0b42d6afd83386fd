"""Chunked collections in both backends: each long document is several points (its chunks), and a
search returns each document once, found by its best chunk, with that chunk's text."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from store.base import DocumentPoint, Hit, VectorStore, point_id
from store.edge import EdgeStore
from store.errors import StoreError
from store.factory import open_store
from store.server import ServerStore
from store.sparse import Bm25Encoder, measure_spec
from store.spec import ChunkingSpec, CollectionSpec

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")

DIM = 16
NAME = "chunked"
BACKENDS = ["edge", "server"]
QUERY = np.eye(DIM, dtype=np.float32)[0]
# doc id -> department, then per chunk: (text, cosine to QUERY). "long" matches best by its 2nd
# chunk, and its two other chunks come right after it: without grouping they would fill the top 3.
DOCS: dict[str, tuple[str, list[tuple[str, float]]]] = {
    "long": (
        "心血管科",
        [
            ("胸痛三天，伴出汗。", 0.95),
            ("服用阿司匹林 aspirin 后缓解。", 1.0),
            ("心电图提示ST段抬高。", 0.9),
        ],
    ),
    "a": ("儿科", [("小儿发热咳嗽。", 0.8)]),
    "b": ("心血管科", [("高血压病史十年。", 0.7), ("血压控制不佳，头晕。", 0.75)]),
    "c": ("心血管科", [("心悸气短。", 0.6)]),
    "d": ("儿科", [("皮疹瘙痒。", 0.5)]),
}
TEXTS = [text for _, chunks in DOCS.values() for text, _ in chunks]
BM25 = measure_spec(TEXTS)
SPEC = CollectionSpec(
    dim=DIM,
    space="test-space",
    encoder="tiny-doc",
    encoder_fingerprint="fp-1",
    keyword_fields=("department",),
    sparse=BM25,
    chunking=ChunkingSpec(max_tokens=64, overlap=8),
)


def at_cosine(cosine: float, axis: int) -> list[float]:
    """A unit vector at ``cosine`` to QUERY (axis 0), the rest of it along ``axis``."""
    v = np.zeros(DIM)
    v[0], v[axis] = cosine, np.sqrt(1 - cosine**2)
    return v.tolist()


def make_points(docs: dict[str, tuple[str, list[tuple[str, float]]]] = DOCS) -> list[DocumentPoint]:
    bm25 = Bm25Encoder(BM25)
    points = []
    axis = 1
    for doc_id, (department, chunks) in docs.items():
        for k, (text, cosine) in enumerate(chunks):
            points.append(
                DocumentPoint(
                    doc_id=doc_id,
                    vector=at_cosine(cosine, axis % DIM or 1),
                    title=f"{doc_id} 标题",
                    text=text,
                    metadata={"department": department},
                    content_hash=f"hash-{doc_id}",
                    sparse=bm25.document(text),
                    chunk=k,
                    chunks=len(chunks),
                )
            )
            axis += 1
    return points


def _open(backend: str, root: Path) -> VectorStore:
    return open_store(None if backend == "edge" else ":memory:", root / "qdrant")


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorStore]:
    s = _open(request.param, tmp_path)
    s.create_collection(NAME, SPEC)
    s.upsert(NAME, make_points())
    yield s
    s.close()


def found(hits: list[Hit]) -> list[tuple[str, int | None]]:
    return [(h.doc_id, h.chunk) for h in hits]


def test_chunked_documents_come_back_once_with_their_best_chunk(store: VectorStore) -> None:
    assert store.count(NAME) == len(TEXTS)  # points are chunks
    hits = store.search(NAME, QUERY, 3)
    assert found(hits) == [("long", 1), ("a", 0), ("b", 1)]
    best = hits[0]
    assert best.text == "服用阿司匹林 aspirin 后缓解。"
    assert best.title == "long 标题" and best.metadata == {"department": "心血管科"}
    np.testing.assert_allclose([h.score for h in hits], [1.0, 0.8, 0.75], atol=1e-5)
    assert hits[2].text == "血压控制不佳，头晕。"


def test_top_k_counts_documents_not_chunks(store: VectorStore) -> None:
    hits = store.search(NAME, QUERY, 100)
    assert found(hits) == [("long", 1), ("a", 0), ("b", 1), ("c", 0), ("d", 0)]
    assert found(store.search(NAME, QUERY, 1)) == [("long", 1)]


def test_filters_apply_before_grouping(store: VectorStore) -> None:
    hits = store.search(NAME, QUERY, 3, filters={"department": "心血管科"})
    assert found(hits) == [("long", 1), ("b", 1), ("c", 0)]
    assert found(store.search(NAME, QUERY, 3, filters={"department": "儿科"})) == [("a", 0), ("d", 0)]


def test_score_threshold_applies_to_chunks(store: VectorStore) -> None:
    # b's best chunk (0.75) passes, so b is found by it; nothing below 0.72 is.
    assert found(store.search(NAME, QUERY, 10, score_threshold=0.72)) == [("long", 1), ("a", 0), ("b", 1)]


def test_hybrid_ends_with_one_hit_per_document(store: VectorStore) -> None:
    bm25 = Bm25Encoder(BM25)
    hits = store.search(NAME, QUERY, 3, sparse=bm25.query("aspirin"))
    # long's 2nd chunk is first on both sides; the other chunks of long fold into it.
    assert found(hits) == [("long", 1), ("a", 0), ("b", 1)]
    assert hits[0].text == "服用阿司匹林 aspirin 后缓解。"
    assert hits[0].score == pytest.approx(2 / 60, rel=1e-4)
    filtered = store.search(NAME, QUERY, 3, filters={"department": "心血管科"}, sparse=bm25.query("aspirin"))
    assert found(filtered) == [("long", 1), ("b", 1), ("c", 0)]
    assert len(store.search(NAME, QUERY, 100, sparse=bm25.query("头晕"))) == len(DOCS)


def test_a_document_of_many_close_chunks_does_not_crowd_out_the_others(store: VectorStore) -> None:
    many = {"many": ("儿科", [(f"第{k}段。", 0.99 - k * 0.001) for k in range(30)])}
    store.upsert(NAME, make_points(many))
    hits = store.search(NAME, QUERY, 3)
    assert found(hits) == [("long", 1), ("many", 0), ("a", 0)]
    hybrid = store.search(NAME, QUERY, 3, sparse=Bm25Encoder(BM25).query("aspirin"))
    assert [h.doc_id for h in hybrid] == ["long", "many", "a"]


def test_rewriting_a_document_with_fewer_chunks_removes_the_rest(store: VectorStore) -> None:
    shorter = {"long": ("心血管科", [("已痊愈出院。", 0.85)])}
    store.upsert(NAME, make_points(shorter))
    assert store.count(NAME) == len(TEXTS) - 2
    hits = store.search(NAME, QUERY, 2)
    assert found(hits) == [("long", 0), ("a", 0)]
    assert hits[0].text == "已痊愈出院。"


def test_content_hashes_need_the_first_and_last_chunk_written(store: VectorStore) -> None:
    assert store.content_hashes(NAME, ["long", "a", "b", "missing"]) == {
        "long": "hash-long",
        "a": "hash-a",
        "b": "hash-b",
    }
    # A new version interrupted after its first chunk: not taken for a complete write.
    newer = [p.model_copy(update={"content_hash": "hash-new"}) for p in make_points() if p.doc_id == "long"]
    store.upsert(NAME, newer[:1])
    assert store.content_hashes(NAME, ["long"]) == {}
    store.upsert(NAME, newer[1:])
    assert store.content_hashes(NAME, ["long"]) == {"long": "hash-new"}


def test_points_must_match_the_collection_layout(store: VectorStore, tmp_path: Path) -> None:
    whole = make_points()[0].model_copy(update={"chunk": None, "chunks": None})
    with pytest.raises(StoreError, match="holds chunks"):
        store.upsert(NAME, [whole])
    plain = SPEC.model_copy(update={"chunking": None})
    store.create_collection("plain", plain)
    with pytest.raises(StoreError, match="holds whole documents"):
        store.upsert("plain", make_points()[:1])
    store.upsert("plain", [whole])
    (hit,) = store.search("plain", QUERY, 1)
    assert hit.chunk is None and hit.doc_id == "long"


def test_chunking_is_part_of_the_spec(store: VectorStore) -> None:
    assert store.get_collection(NAME) == SPEC
    other = SPEC.model_copy(update={"chunking": ChunkingSpec(max_tokens=64, overlap=0)})
    with pytest.raises(StoreError, match="chunking"):
        store.create_collection(NAME, other)
    with pytest.raises(StoreError, match="chunking"):
        store.create_collection(NAME, SPEC.model_copy(update={"chunking": None}))


def test_specs_written_before_chunking_existed_still_compare_equal() -> None:
    old = SPEC.model_copy(update={"chunking": None}).model_dump(mode="json")
    del old["chunking"]
    assert CollectionSpec.model_validate(old) == SPEC.model_copy(update={"chunking": None})


def test_chunk_point_ids_are_stable_and_distinct() -> None:
    ids = [point_id("doc-1")] + [point_id("doc-1", k) for k in range(3)] + [point_id("doc-10", 0)]
    assert len(set(ids)) == len(ids)
    assert point_id("doc-1", 2) == point_id("doc-1", 2)
    assert point_id("doc-1", None) == point_id("doc-1")
    assert point_id("doc-1", 0) == "bbf2f04d-fcde-5600-9f6c-f4ee23e4b6f3"  # fixed across releases


def test_chunk_fields_are_checked() -> None:
    point = make_points()[0]
    with pytest.raises(ValueError, match="together"):
        point.model_validate({**point.model_dump(), "chunks": None})
    with pytest.raises(ValueError, match="chunk 3 of a document with 3"):
        point.model_validate({**point.model_dump(), "chunk": 3})
    with pytest.raises(ValueError, match="overlap"):
        ChunkingSpec(max_tokens=8, overlap=8)


def test_grouping_has_a_doc_id_index_in_both_backends(tmp_path: Path) -> None:
    edge = EdgeStore(tmp_path / "edge")
    edge.create_collection(NAME, SPEC)
    edge.create_collection("plain", SPEC.model_copy(update={"chunking": None}))
    assert "doc_id" in edge._collection(NAME).shard.info().payload_schema
    assert "doc_id" not in edge._collection("plain").shard.info().payload_schema
    edge.close()
    # qdrant-client's local mode keeps no payload indexes: the calls a server would get are checked.
    server = ServerStore(":memory:")
    indexed: list[str] = []
    create_index = server._client.create_payload_index

    def spy(collection: str, field_name: str, **kwargs: object) -> object:
        indexed.append(f"{collection}/{field_name}")
        return create_index(collection, field_name, **kwargs)  # type: ignore[arg-type]

    server._client.create_payload_index = spy  # type: ignore[method-assign]
    server.create_collection(NAME, SPEC)
    server.create_collection("plain", SPEC.model_copy(update={"chunking": None}))
    assert f"{NAME}/doc_id" in indexed and "plain/doc_id" not in indexed
    assert f"{NAME}/metadata.department" in indexed
    server.close()


def test_backends_agree_on_chunked_search(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    # A few chunks hold the BM25 term, each a different number of times: no ties on the sparse side,
    # whose order the engines would break differently.
    term_counts = {(3, 0): 1, (8, 0): 2, (13, 2): 3, (22, 1): 4}

    def text(i: int, k: int) -> str:
        return f"文本 {i} 第{k}段" + " 阿司匹林" * term_counts.get((i, k), 0)

    docs = {
        f"doc-{i}": ("心血管科" if i % 2 else "儿科", [(text(i, k), 0.0) for k in range(1 + i % 4)])
        for i in range(40)
    }
    points = make_points(docs)
    vectors = rng.normal(size=(len(points), DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    points = [p.model_copy(update={"vector": v.tolist()}) for p, v in zip(points, vectors, strict=True)]
    query = rng.normal(size=DIM)
    answers = []
    for backend in BACKENDS:
        s = _open(backend, tmp_path / backend)
        s.create_collection(NAME, SPEC)
        s.upsert(NAME, points)
        runs = [
            s.search(NAME, query, 10),
            s.search(NAME, query, 5, filters={"department": "儿科"}),
            s.search(NAME, query, 10, sparse=Bm25Encoder(BM25).query("阿司匹林")),
        ]
        answers.append([[(h.doc_id, h.chunk, round(h.score, 4)) for h in run] for run in runs])
        for run in runs:
            assert len({h.doc_id for h in run}) == len(run)
        s.close()
    assert answers[0] == answers[1]


def test_grouped_search_stays_exact_while_its_first_fetch_adapts() -> None:
    from store.schema import CHUNK_OVERFETCH, ChunkRate, Scored, grouped_by_overfetch

    # Ranked chunks: doc "x" holds the 12 best, then one chunk each of 20 other documents.
    ranked: list[Scored] = [({"doc_id": "x", "chunk": k}, 1.0 - k / 100) for k in range(12)]
    ranked += [({"doc_id": f"d{i}"}, 0.5 - i / 100) for i in range(20)]
    singles = ranked[12:]
    limits: list[int] = []

    def fetch(points: list[Scored]) -> Callable[[int], list[Scored]]:
        def run(limit: int) -> list[Scored]:
            limits.append(limit)
            return points[:limit]

        return run

    rate = ChunkRate()
    assert rate.first_limit(10) == 10 * CHUNK_OVERFETCH  # nothing seen yet: the old fixed depth
    for _ in range(60):  # a collection whose hits are one chunk per document
        grouped_by_overfetch(fetch(singles), 10, rate)
    assert rate.first_limit(10) <= 13
    limits.clear()
    best = grouped_by_overfetch(fetch(ranked), 10, rate)
    # The shallow first fetch held 2 documents: it fetched deeper until it had 10, best chunk each.
    assert [h.doc_id for h in best] == ["x"] + [f"d{i}" for i in range(9)]
    assert best[0].chunk == 0
    assert limits[0] <= 13 and limits[-1] >= 21 and len(limits) >= 2
    assert best == grouped_by_overfetch(fetch(ranked), 10)  # the fixed depth agrees


def test_edge_grouped_searches_match_the_server_over_many_queries(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    # Mostly one-chunk documents (the chunk rate falls), a few with six chunks.
    docs = {
        f"doc-{i}": ("儿科", [(f"文本 {i} 第{k}段", 0.0) for k in range(6 if i % 10 == 0 else 1)])
        for i in range(60)
    }
    points = make_points(docs)
    vectors = rng.normal(size=(len(points), DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    points = [p.model_copy(update={"vector": v.tolist()}) for p, v in zip(points, vectors, strict=True)]
    queries = rng.normal(size=(40, DIM))
    answers = []
    for backend in BACKENDS:
        s = _open(backend, tmp_path / backend)
        s.create_collection(NAME, SPEC)
        s.upsert(NAME, points)
        answers.append(
            [[(h.doc_id, h.chunk, round(h.score, 4)) for h in s.search(NAME, q, 8)] for q in queries]
        )
        if isinstance(s, EdgeStore):
            assert s._collection(NAME).chunk_rate.first_limit(8) < 8 * 4
        s.close()
    assert answers[0] == answers[1]
