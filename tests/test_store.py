"""The store layer: one behavioural suite run against both backends, plus their congruence.

Backends: the embedded engine (qdrant-edge) in tmp_path, and the server backend in qdrant-client's
':memory:' mode (same code path as a real server, minus the network).
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from store.aliases import ALIASES_FILE, AliasCatalog
from store.base import DocumentPoint, Hit, VectorStore
from store.edge import SPEC_FILE, STAGING_PREFIX, EdgeStore
from store.errors import StoreError, StoreUnavailable
from store.factory import open_store
from store.filters import Condition, Filter, FilterError, FilterLike, Range
from store.server import SPEC_KEY, ServerStore
from store.sparse import Bm25Encoder, measure_spec
from store.spec import CollectionSpec
from tests.servers import free_port

# qdrant-client's local mode warns that payload indexes are no-ops there; the server path still
# creates them, which is the point of running the same code.
pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")

DIM = 32
NAME = "docs"
DEPARTMENTS = ["心血管科", "神经内科", "儿科"]
LANGS = ["zh", "en"]
SPEC = CollectionSpec(
    dim=DIM,
    space="test-space",
    encoder="tiny-doc",
    encoder_fingerprint="fp-1",
    keyword_fields=("department", "lang"),
    integer_fields=("year",),
    date_fields=("updated",),
)


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_points(n: int = 300, seed: int = 0) -> list[DocumentPoint]:
    vectors = unit(np.random.default_rng(seed), n)
    return [
        DocumentPoint(
            doc_id=f"doc-{i}",
            vector=vectors[i].tolist(),
            title=f"标题 {i}",
            text=f"正文 {i}",
            metadata={
                "department": DEPARTMENTS[i % 3],
                "lang": LANGS[i % 2],
                "year": 2000 + i % 7,
                "updated": f"2024-0{1 + i % 9}-15" if i % 2 else f"2024-0{1 + i % 9}-15T08:30:00Z",
                "code": f"c{i % 5}",
            },
            content_hash=f"hash-{i}",
        )
        for i in range(n)
    ]


def brute_force(
    points: list[DocumentPoint], query: np.ndarray, k: int, filters: dict[str, str] | None = None
) -> list[tuple[str, float]]:
    kept = [p for p in points if all(p.metadata.get(key) == v for key, v in (filters or {}).items())]
    matrix = np.array([p.vector for p in kept], dtype=np.float64)
    scores = matrix @ (query / np.linalg.norm(query))
    order = np.argsort(-scores)[:k]
    return [(kept[i].doc_id, float(scores[i])) for i in order]


def ids_scores(hits: list[Hit]) -> list[tuple[str, float]]:
    return [(h.doc_id, h.score) for h in hits]


def assert_same_ranking(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [d for d, _ in got] == [d for d, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-4)


Loaded = tuple[VectorStore, list[DocumentPoint]]

FILTER_CASES: list[dict[str, str] | None] = [
    None,
    {"department": "心血管科"},
    {"department": "儿科", "lang": "en"},
]


def _open(backend: str, root: Path) -> VectorStore:
    return open_store(None if backend == "edge" else ":memory:", root / "qdrant")


@pytest.fixture(params=["edge", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorStore]:
    s = _open(request.param, tmp_path)
    yield s
    s.close()


@pytest.fixture(scope="module", params=["edge", "server"])
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    """A collection of 300 points shared by the tests that leave its content as it is."""
    s = _open(request.param, tmp_path_factory.mktemp(request.param))
    points = make_points()
    s.create_collection(NAME, SPEC)
    s.upsert(NAME, points)
    yield s, points
    s.close()


# --- both backends -------------------------------------------------------------------------------


def test_collection_spec_round_trip(store: VectorStore) -> None:
    assert store.get_collection(NAME) is None
    store.create_collection(NAME, SPEC)
    assert store.get_collection(NAME) == SPEC
    store.create_collection(NAME, SPEC)  # same spec: no-op
    store.create_collection(NAME, SPEC.model_copy(update={"keyword_fields": ("lang", "department")}))
    assert store.get_collection(NAME) == SPEC
    assert store.count(NAME) == 0
    store.ping()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"dim": 64}, "dim"),
        ({"encoder_fingerprint": "fp-2"}, "encoder_fingerprint"),
        ({"keyword_fields": ("department",)}, "keyword_fields"),
    ],
)
def test_create_with_different_spec_names_the_difference(
    store: VectorStore, change: dict[str, object], named: str
) -> None:
    store.create_collection(NAME, SPEC)
    with pytest.raises(StoreError, match=named) as info:
        store.create_collection(NAME, SPEC.model_copy(update=change))
    assert not isinstance(info.value, StoreUnavailable)
    assert store.get_collection(NAME) == SPEC


def test_search_matches_brute_force(loaded: Loaded) -> None:
    store, points = loaded
    queries = unit(np.random.default_rng(1), 15)
    for filters in FILTER_CASES:
        for q in queries:
            hits = store.search(NAME, q, 10, filters=filters)
            assert_same_ranking(ids_scores(hits), brute_force(points, q, 10, filters))
            for h in hits:
                assert all(h.metadata[k] == v for k, v in (filters or {}).items())


def test_score_threshold_is_applied_by_the_engine(loaded: Loaded) -> None:
    store, points = loaded
    q = unit(np.random.default_rng(2), 1)[0]
    expected = brute_force(points, q, 50, None)
    cut = expected[9][1]  # the 10th best score
    hits = store.search(NAME, q, 50, score_threshold=cut - 1e-6)
    assert_same_ranking(ids_scores(hits), expected[:10])


def test_hits_carry_the_stored_payload(loaded: Loaded) -> None:
    store, points = loaded
    target = points[42]
    [hit] = store.search(NAME, np.array(target.vector), 1)
    assert hit.doc_id == target.doc_id
    assert hit.score == pytest.approx(1.0, abs=1e-4)
    assert (hit.title, hit.text, hit.metadata) == (target.title, target.text, target.metadata)


def test_filter_value_without_matches_returns_nothing(loaded: Loaded) -> None:
    store, _ = loaded
    assert store.search(NAME, np.ones(DIM), 5, filters={"department": "眼科"}) == []


def test_filter_on_unindexed_key_is_refused(loaded: Loaded) -> None:
    store, _ = loaded
    with pytest.raises(StoreError, match="code"):
        store.search(NAME, np.ones(DIM), 5, filters={"code": "c1"})


def _month(p: DocumentPoint) -> int:
    return int(str(p.metadata["updated"])[5:7])


# (filter, the same test in Python over the points' metadata)
RICH_FILTERS: list[tuple[Filter, Callable[[DocumentPoint], bool]]] = [
    (
        Filter(must=[Condition(key="year", range=Range(gte=2002, lt=2005))]),
        lambda p: 2002 <= int(p.metadata["year"]) < 2005,  # type: ignore[call-overload]
    ),
    (
        Filter(
            must=[Condition(key="department", any=["儿科", "神经内科"])],
            must_not=[Condition(key="year", match=2003)],
        ),
        lambda p: p.metadata["department"] in ("儿科", "神经内科") and p.metadata["year"] != 2003,
    ),
    (
        Filter(
            should=[
                Condition(key="lang", match="en"),
                Condition(key="updated", range=Range(lt="2024-03-01")),
            ]
        ),
        lambda p: p.metadata["lang"] == "en" or _month(p) < 3,
    ),
    (
        # Dates compare as instants: a date alone is its midnight, date-times keep their zone.
        Filter(must=[Condition(key="updated", range=Range(gte="2024-05-15", lte="2024-07-15T08:30:00Z"))]),
        lambda p: 5 <= _month(p) <= 7,
    ),
]


@pytest.mark.parametrize("case", range(len(RICH_FILTERS)))
def test_must_should_must_not_on_keyword_integer_and_date_fields(loaded: Loaded, case: int) -> None:
    store, points = loaded
    where, keep = RICH_FILTERS[case]
    kept = [p for p in points if keep(p)]
    assert 0 < len(kept) < len(points)
    query = unit(np.random.default_rng(case), 1)[0]
    hits = store.search(NAME, query, len(points), filters=where)
    assert {h.doc_id for h in hits} == {p.doc_id for p in kept}
    assert_same_ranking(ids_scores(hits)[:10], brute_force(kept, query, 10))


@pytest.mark.parametrize(
    ("where", "named"),
    [
        (Filter(must=[Condition(key="department", range=Range(gt=1))]), "keyword field"),
        (Filter(must=[Condition(key="year", match="2001")]), "int values"),
        (Filter(should=[Condition(key="updated", match="2024-01-15")]), "range of ISO 8601"),
        (Filter(must_not=[Condition(key="updated", range=Range(gt="last week"))]), "ISO 8601"),
        (Filter(must=[Condition(key="lang", match="en"), Condition(key="code", match="c1")]), "must.1"),
        ({"lang": 7}, "filter.lang: keyword field 'lang'"),  # the short form names the key
    ],
)
def test_filters_the_collection_cannot_apply_are_refused(
    loaded: Loaded, where: FilterLike, named: str
) -> None:
    store, _ = loaded
    with pytest.raises(FilterError, match=named) as info:
        store.search(NAME, np.ones(DIM), 5, filters=where)
    assert isinstance(info.value, StoreError) and not isinstance(info.value, StoreUnavailable)


def test_top_k_larger_than_collection_returns_all(store: VectorStore) -> None:
    store.create_collection(NAME, SPEC)
    store.upsert(NAME, make_points(4))
    assert len(store.search(NAME, np.ones(DIM), 10)) == 4
    with pytest.raises(ValueError):
        store.search(NAME, np.ones(DIM), 0)


def test_reupsert_overwrites_instead_of_duplicating(store: VectorStore) -> None:
    points = make_points(60)
    store.create_collection(NAME, SPEC)
    store.upsert(NAME, points)
    store.upsert(NAME, points)
    assert store.count(NAME) == len(points)
    changed = points[7].model_copy(update={"text": "新正文", "content_hash": "hash-new"})
    store.upsert(NAME, [changed])
    assert store.count(NAME) == len(points)
    [hit] = store.search(NAME, np.array(changed.vector), 1)
    assert (hit.doc_id, hit.text) == (changed.doc_id, "新正文")
    assert store.content_hashes(NAME, [changed.doc_id]) == {changed.doc_id: "hash-new"}


def test_content_hashes_of_stored_documents_only(loaded: Loaded) -> None:
    store, _ = loaded
    got = store.content_hashes(NAME, ["doc-3", "doc-299", "missing", "doc-3"])
    assert got == {"doc-3": "hash-3", "doc-299": "hash-299"}
    assert store.content_hashes(NAME, []) == {}


def test_empty_upsert_is_a_noop(store: VectorStore) -> None:
    store.upsert("never-created", [])
    store.create_collection(NAME, SPEC)
    store.upsert(NAME, [])
    assert store.count(NAME) == 0


def test_missing_collection_is_a_store_error(store: VectorStore) -> None:
    for call in (
        lambda: store.search("absent", np.ones(DIM), 3),
        lambda: store.count("absent"),
        lambda: store.upsert("absent", make_points(1)),
        lambda: store.content_hashes("absent", ["doc-1"]),
    ):
        with pytest.raises(StoreError, match="absent") as info:
            call()
        assert not isinstance(info.value, StoreUnavailable)


def test_wrong_dimension_is_refused(loaded: Loaded) -> None:
    store, points = loaded
    with pytest.raises(StoreError, match="dimensions"):
        store.search(NAME, np.ones(DIM + 1), 3)
    bad = points[0].model_copy(update={"doc_id": "bad", "vector": [0.1] * (DIM - 1)})
    with pytest.raises(StoreError, match="bad"):
        store.upsert(NAME, [bad])
    assert store.count(NAME) == len(points)


def test_concurrent_rewrites_are_never_seen_half_done(store: VectorStore) -> None:
    """Writers flip every point between two versions (vector and payload change together) while
    readers search. Every hit must carry the payload of the vector that scored it, every search must
    see all points, and the last write wins: a torn point, a lost point or a lost write fails here.

    Re-upserting identical points (as this test once did) could not show any of that: whatever the
    engine did in between, readers saw the same data.
    """
    rng = np.random.default_rng(7)
    n = 120
    versions = [unit(rng, n), unit(rng, n)]

    def version(v: int, rows: range) -> list[DocumentPoint]:
        return [
            DocumentPoint(
                doc_id=f"doc-{i}",
                vector=versions[v][i].tolist(),
                text=f"v{v}",
                metadata={"department": DEPARTMENTS[i % 3], "lang": LANGS[i % 2]},
                content_hash=f"v{v}-{i}",
            )
            for i in rows
        ]

    store.create_collection(NAME, SPEC)
    store.upsert(NAME, version(0, range(n)))
    queries = unit(rng, 8)
    problems: list[str] = []

    def read(q: np.ndarray) -> None:
        for _ in range(15):
            hits = store.search(NAME, q, n)
            if len(hits) != n:
                problems.append(f"a search saw {len(hits)} of {n} points")
            for hit in hits:
                v = int(hit.text[1])
                want = float(versions[v][int(hit.doc_id.split("-")[1])] @ q)
                if abs(hit.score - want) > 1e-4:
                    problems.append(f"{hit.doc_id}: payload v{v} with another version's vector")

    def write(round_: int) -> None:
        for block in range(0, n, 20):
            store.upsert(NAME, version(round_ % 2, range(block, block + 20)))

    with ThreadPoolExecutor(max_workers=6) as pool:
        jobs = [pool.submit(write, r) for r in range(1, 8)] + [pool.submit(read, q) for q in queries]
        for job in jobs:
            job.result()
    assert problems == []
    store.upsert(NAME, version(1, range(n)))
    assert store.count(NAME) == n
    assert {h.text for h in store.search(NAME, queries[0], n)} == {"v1"}


def test_closed_store_refuses(store: VectorStore) -> None:
    store.create_collection(NAME, SPEC)
    store.close()
    with pytest.raises(StoreError):
        store.search(NAME, np.ones(DIM), 3)


# --- the two backends agree -----------------------------------------------------------------------


def test_backends_return_identical_rankings(tmp_path: Path) -> None:
    points = make_points(300, seed=5)
    edge, server = open_store(None, tmp_path / "edge"), open_store(":memory:", tmp_path)
    try:
        for s in (edge, server):
            s.create_collection(NAME, SPEC)
            s.upsert(NAME, points)
        assert edge.count(NAME) == server.count(NAME) == 300
        for q in unit(np.random.default_rng(6), 25):
            for filters in FILTER_CASES:
                assert_same_ranking(
                    ids_scores(edge.search(NAME, q, 8, filters=filters)),
                    ids_scores(server.search(NAME, q, 8, filters=filters)),
                )
        ids = [p.doc_id for p in points[::7]] + ["missing"]
        assert edge.content_hashes(NAME, ids) == server.content_hashes(NAME, ids)
    finally:
        edge.close()
        server.close()


# --- embedded backend -----------------------------------------------------------------------------


def test_edge_persists_across_reopen(tmp_path: Path) -> None:
    points = make_points(50)
    first = EdgeStore(tmp_path)
    first.create_collection(NAME, SPEC)
    first.upsert(NAME, points)
    query = np.array(points[3].vector)
    before = ids_scores(first.search(NAME, query, 5, filters={"lang": "en"}))
    first.close()

    assert CollectionSpec.model_validate_json((tmp_path / NAME / SPEC_FILE).read_text()) == SPEC
    second = EdgeStore(tmp_path)
    try:
        assert second.get_collection(NAME) == SPEC
        assert second.count(NAME) == 50
        assert ids_scores(second.search(NAME, query, 5, filters={"lang": "en"})) == before
        assert second.content_hashes(NAME, ["doc-1"]) == {"doc-1": "hash-1"}
    finally:
        second.close()


def test_edge_shard_in_use_by_another_store_is_unavailable(tmp_path: Path) -> None:
    first = EdgeStore(tmp_path)
    first.create_collection(NAME, SPEC)
    second = EdgeStore(tmp_path)
    with pytest.raises(StoreUnavailable, match="in use"):
        second.count(NAME)
    first.close()
    assert second.count(NAME) == 0
    second.close()


def test_edge_discards_an_interrupted_creation(tmp_path: Path) -> None:
    staging = tmp_path / f"{STAGING_PREFIX}{NAME}"
    (staging / "shard").mkdir(parents=True)
    (staging / "shard" / "junk").write_text("half-written")
    store = EdgeStore(tmp_path)
    store.create_collection(NAME, SPEC)
    assert not staging.exists()
    assert store.count(NAME) == 0
    store.close()


def test_edge_refuses_foreign_directories_and_path_like_names(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    store = EdgeStore(tmp_path)
    with pytest.raises(StoreError, match="not a medsearch collection"):
        store.create_collection("other", SPEC)
    for name in ("../escape", "a/b", ".hidden", ""):
        with pytest.raises(StoreError, match="invalid collection name"):
            store.create_collection(name, SPEC)
    assert not (tmp_path.parent / "escape").exists()
    store.close()


def test_edge_ping_reports_a_missing_directory(tmp_path: Path) -> None:
    root = tmp_path / "qdrant"
    store = EdgeStore(root)
    store.ping()
    root.rmdir()
    with pytest.raises(StoreUnavailable):
        store.ping()


def test_edge_answers_from_disk_only_not_from_handles_to_vanished_files(tmp_path: Path) -> None:
    root = tmp_path / "qdrant"
    store = EdgeStore(root)
    store.create_collection(NAME, SPEC)
    store.upsert(NAME, make_points(20))
    query = np.array(make_points(20)[0].vector)
    try:
        # The data directory moved away (volume unmounted): unavailable, not answers from open files.
        root.rename(tmp_path / "away")
        for call in (store.ping, lambda: store.search(NAME, query, 3), lambda: store.get_collection(NAME)):
            with pytest.raises(StoreUnavailable, match="missing"):
                call()
        (tmp_path / "away").rename(root)
        assert store.search(NAME, query, 1)[0].doc_id == "doc-0"

        # One collection deleted by hand while open: gone, not served from its old handle.
        shutil.rmtree(root / NAME)
        assert store.get_collection(NAME) is None
        with pytest.raises(StoreError, match="does not exist"):
            store.search(NAME, query, 3)
    finally:
        store.close()


# --- server backend -------------------------------------------------------------------------------


def test_server_keeps_the_spec_in_collection_metadata() -> None:
    store = ServerStore(":memory:")
    store.create_collection(NAME, SPEC)
    info = store._client.get_collection(NAME)
    assert info.config.metadata == {SPEC_KEY: json.loads(SPEC.model_dump_json())}
    # A collection some other tool created: no spec, so it is refused rather than trusted.
    store._client.create_collection("foreign", vectors_config=None)
    with pytest.raises(StoreError, match="no medsearch spec"):
        store.get_collection("foreign")
    store.close()


def test_unreachable_server_is_unavailable(tmp_path: Path) -> None:
    store = open_store(f"http://127.0.0.1:{free_port()}", tmp_path, timeout_s=0.5)
    for call in (
        store.ping,
        lambda: store.search(NAME, np.ones(DIM), 3),
        lambda: store.get_collection(NAME),
        lambda: store.create_collection(NAME, SPEC),
        lambda: store.upsert(NAME, make_points(1)),
    ):
        with pytest.raises(StoreUnavailable, match="unreachable"):
            call()
    store.close()


def test_server_that_never_answers_times_out_as_unavailable(tmp_path: Path) -> None:
    with socket.socket() as listener:
        # Connections complete in the kernel backlog but nobody ever reads or answers.
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        store = open_store(f"http://127.0.0.1:{port}", tmp_path, timeout_s=0.2)
        with pytest.raises(StoreUnavailable, match="Timeout"):
            store.ping()
        store.close()


@pytest.fixture
def answering(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fake Qdrant answering every request with the status given by indirect parametrization."""
    status: int = request.param

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"status": {"error": "nope"}, "time": 0.0}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("answering", [503, 502, 429], indirect=True)
def test_server_overload_answers_are_unavailable(answering: str, tmp_path: Path) -> None:
    store = open_store(answering, tmp_path)
    with pytest.raises(StoreUnavailable, match="answered"):
        store.ping()
    store.close()


@pytest.mark.parametrize("answering", [400, 401, 403], indirect=True)
@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_server_refusals_are_store_errors(
    answering: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = open_store(answering, tmp_path, api_key="wrong")
    with pytest.raises(StoreError, match="answered") as info:
        store.ping()
    assert not isinstance(info.value, StoreUnavailable)
    assert info.value.status == request.node.callspec.params["answering"]  # loggable, unlike the body
    store.close()


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    edge = open_store(None, tmp_path)
    assert isinstance(edge, EdgeStore)
    edge.close()
    assert isinstance(open_store(":memory:", tmp_path), ServerStore)
    assert isinstance(open_store("https://qdrant.example:6333", tmp_path, api_key="k"), ServerStore)
    with pytest.raises(ValueError, match="unsupported"):
        open_store("qdrant.example:6333", tmp_path)


# --- hybrid: dense + BM25 fused by reciprocal rank ------------------------------------------------

HYBRID_TEXTS = [
    "高血压病人可以口服党参吗",
    "感冒发烧多喝水，注意休息",
    "阿莫西林 500mg 胶囊用于细菌感染",
    "糖尿病患者饮食要控制糖分",
    "布洛芬缓释胶囊可以缓解头痛",
    "儿童哮喘夜间咳嗽加重",
]


def _hybrid_points(bm25: Bm25Encoder) -> list[DocumentPoint]:
    vectors = unit(np.random.default_rng(11), len(HYBRID_TEXTS))
    return [
        DocumentPoint(
            doc_id=f"h-{i}",
            vector=vectors[i].tolist(),
            text=text,
            metadata={"department": DEPARTMENTS[i % 3], "lang": "zh"},
            content_hash=f"h{i}",
            sparse=bm25.document(text),
        )
        for i, text in enumerate(HYBRID_TEXTS)
    ]


def test_hybrid_search_finds_exact_terms_the_dense_side_misses(tmp_path: Path) -> None:
    bm25_spec = measure_spec(HYBRID_TEXTS)
    assert 2 <= bm25_spec.avg_len <= 10
    bm25 = Bm25Encoder(bm25_spec)
    spec = SPEC.model_copy(update={"sparse": bm25_spec})
    points = _hybrid_points(bm25)
    # A dense query far from every document: only the BM25 side can put 阿莫西林 first.
    away = -np.mean([p.vector for p in points], axis=0)
    answers = []
    for backend in ("edge", "server"):
        store = _open(backend, tmp_path / backend)
        store.create_collection(NAME, spec)
        assert store.get_collection(NAME) == spec
        store.upsert(NAME, points)
        hits = store.search(NAME, away, 3, sparse=bm25.query("阿莫西林"))
        assert hits[0].doc_id == "h-2"
        dense = [h.doc_id for h in store.search(NAME, away, 6)]
        assert dense[0] != "h-2"
        # Reciprocal rank fusion (Qdrant ranks from 0): first on the BM25 side, wherever on the dense.
        assert hits[0].score == pytest.approx(1 / 60 + 1 / (60 + dense.index("h-2")), rel=1e-4)
        # Filters apply to both sides before fusion.
        filtered = store.search(
            NAME, away, 6, filters={"department": "心血管科"}, sparse=bm25.query("阿莫西林")
        )
        assert {h.doc_id for h in filtered} == {"h-0", "h-3"}
        answers.append(ids_scores(store.search(NAME, away, 6, sparse=bm25.query("胶囊 头痛"))))
        store.close()
    assert_same_ranking(answers[0], answers[1])


def test_hybrid_needs_bm25_vectors_on_both_sides(store: VectorStore) -> None:
    bm25 = Bm25Encoder(measure_spec(HYBRID_TEXTS))
    store.create_collection(NAME, SPEC)
    points = _hybrid_points(bm25)
    with pytest.raises(StoreError, match="holds no BM25"):
        store.upsert(NAME, points[:1])
    store.upsert(NAME, [p.model_copy(update={"sparse": None}) for p in points])
    with pytest.raises(StoreError, match="--sparse bm25") as info:
        store.search(NAME, np.ones(DIM), 3, sparse=bm25.query("阿莫西林"))
    assert not isinstance(info.value, StoreUnavailable)


# --- aliases, listing, deletion (what blue/green reindexing stands on) ----------------------------


def test_alias_switch_moves_every_call_and_keeps_the_old_collection(store: VectorStore) -> None:
    blue, green = make_points(20, seed=1), make_points(20, seed=2)
    for name, points in (("docs--v0001", blue), ("docs--v0002", green)):
        store.create_collection(name, SPEC)
        store.upsert(name, points)
    store.switch_alias("docs", "docs--v0001")
    query = np.array(green[3].vector)
    assert store.aliases() == {"docs": "docs--v0001"}
    assert store.get_collection("docs") == SPEC
    assert store.search("docs", query, 1)[0].doc_id == brute_force(blue, query, 1)[0][0]

    store.switch_alias("docs", "docs--v0002")
    assert store.aliases() == {"docs": "docs--v0002"}
    assert store.get_collection("docs") == SPEC
    hit = store.search("docs", query, 1)[0]
    assert (hit.doc_id, round(hit.score, 4)) == ("doc-3", 1.0)
    assert store.list_collections() == ["docs--v0001", "docs--v0002"]  # aliases are not collections
    assert store.search("docs--v0001", query, 1)[0].doc_id == brute_force(blue, query, 1)[0][0]


def test_a_served_collection_cannot_be_deleted_and_a_retired_one_can(store: VectorStore) -> None:
    store.create_collection("docs--v0001", SPEC)
    store.create_collection("docs--v0002", SPEC)
    store.switch_alias("docs", "docs--v0001")
    with pytest.raises(StoreError, match="alias 'docs'"):
        store.delete_collection("docs--v0001")
    store.switch_alias("docs", "docs--v0002")
    store.delete_collection("docs--v0001")
    store.delete_collection("docs--v0001")  # already gone: nothing to do
    assert store.list_collections() == ["docs--v0002"]
    with pytest.raises(StoreError):
        store.switch_alias("docs", "docs--v0001")
    assert store.aliases() == {"docs": "docs--v0002"}


def test_document_ids_vectors_and_deletes(store: VectorStore) -> None:
    points = make_points(2500)  # more than one scroll page
    store.create_collection(NAME, SPEC)
    store.upsert(NAME, points)
    assert sorted(store.document_ids(NAME)) == sorted(p.doc_id for p in points)
    got = store.vectors(NAME, ["doc-7", "missing"])
    assert list(got) == ["doc-7"]
    np.testing.assert_allclose(got["doc-7"], points[7].vector, atol=1e-6)
    store.delete_documents(NAME, ["doc-7", "doc-8", "missing"])
    assert store.count(NAME) == 2498
    assert store.content_hashes(NAME, ["doc-7", "doc-8", "doc-9"]) == {"doc-9": "hash-9"}


def test_edge_alias_switch_is_seen_by_another_process_store(tmp_path: Path) -> None:
    """Two EdgeStores on one directory stand for the indexer and the service: the service follows the
    indexer's switch on its next call and forgets (without closing under its searches) the old one."""
    indexer, service = EdgeStore(tmp_path / "q"), EdgeStore(tmp_path / "q")
    try:
        for name, seed in (("docs--v0001", 1), ("docs--v0002", 2)):
            indexer.create_collection(name, SPEC)
            indexer.upsert(name, make_points(5, seed=seed))
        indexer.switch_alias("docs", "docs--v0001")
        indexer.close()  # the indexer process ends; its shards are free for the service to open
        indexer = EdgeStore(tmp_path / "q")
        query = np.array(make_points(5, seed=2)[1].vector)
        assert service.search("docs", query, 1)[0].score < 0.999
        indexer.switch_alias("docs", "docs--v0002")
        assert service.search("docs", query, 1)[0].score == pytest.approx(1.0, abs=1e-4)
        # The service no longer holds v0001: the indexer can open and delete it.
        assert indexer.count("docs--v0001") == 5
        indexer.delete_collection("docs--v0001")
        assert service.list_collections() == ["docs--v0002"]
    finally:
        indexer.close()
        service.close()


def test_alias_catalog_follows_another_writer_and_names_what_it_retired(tmp_path: Path) -> None:
    ours, theirs = AliasCatalog(tmp_path), AliasCatalog(tmp_path)
    assert ours.read() == ({}, set())
    with theirs.locked():
        theirs.write({"docs": "docs--v0001", "old": "docs--v0000"})
    assert ours.read() == ({"docs": "docs--v0001", "old": "docs--v0000"}, set())
    with theirs.locked():
        theirs.write({"docs": "docs--v0002", "old": "docs--v0000"})
    assert ours.read() == ({"docs": "docs--v0002", "old": "docs--v0000"}, {"docs--v0001"})
    assert ours.read()[1] == set()  # reported once, on the read that saw the change
    (tmp_path / ALIASES_FILE).write_text('["not", "a", "mapping"]')
    with pytest.raises(StoreError, match="not an alias -> collection object"):
        ours.read()


def test_an_alias_and_a_collection_cannot_share_a_name(store: VectorStore) -> None:
    store.create_collection("docs--v0001", SPEC)
    store.create_collection("plain", SPEC)
    with pytest.raises(StoreError):
        store.switch_alias("plain", "docs--v0001")


def test_server_bulk_load_defers_the_graph_and_waits_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bulk collection is created without HNSW (m 0) so uploads do not rebuild it; optimize turns it
    on and returns only once the server reports the collection indexed (green)."""
    from types import SimpleNamespace

    from qdrant_client import models

    store = ServerStore(":memory:")
    real = store._client
    created: dict[str, object] = {}
    statuses = iter([models.CollectionStatus.YELLOW, models.CollectionStatus.YELLOW])
    updates: list[models.HnswConfigDiff] = []

    class Recording:
        def __getattr__(self, name: str):
            return getattr(real, name)

        def create_collection(self, name: str, **kwargs: object) -> bool:
            created.update(kwargs)
            return real.create_collection(name, **kwargs)  # type: ignore[arg-type]

        def get_collection(self, name: str):
            info = real.get_collection(name)
            m = 0 if not updates else updates[-1].m
            status = next(statuses, models.CollectionStatus.GREEN) if updates else info.status
            config = SimpleNamespace(hnsw_config=SimpleNamespace(m=m), metadata=info.config.metadata)
            return SimpleNamespace(config=config, status=status, payload_schema=info.payload_schema)

        def update_collection(self, name: str, hnsw_config: models.HnswConfigDiff) -> bool:
            updates.append(hnsw_config)
            return True

    monkeypatch.setattr(store, "_client", Recording())
    monkeypatch.setattr("store.server.time.sleep", lambda _s: None)
    store.create_collection(NAME, SPEC, bulk=True)
    assert created["hnsw_config"] == models.HnswConfigDiff(m=0)
    store.upsert(NAME, make_points(5))
    store.optimize(NAME)
    assert [u.m for u in updates] == [16]
    assert next(statuses, None) is None  # polled through both yellow answers before returning
    store.optimize(NAME)  # already indexed: nothing more to switch on
    assert len(updates) == 1
    real.close()


def test_edge_sizes_the_search_pool_of_the_shards_it_opens(tmp_path: Path) -> None:
    root = tmp_path / "qdrant"
    points = make_points(50)
    builder = EdgeStore(root)
    builder.create_collection(NAME, SPEC)
    builder.upsert(NAME, points)
    query = np.array(points[7].vector)
    default_hits = ids_scores(builder.search(NAME, query, 5))
    builder.close()
    config = root / NAME / "shard" / "edge_config.json"
    assert "max_search_threads" not in json.loads(config.read_text())

    one = EdgeStore(root, search_threads=1)
    assert ids_scores(one.search(NAME, query, 5)) == default_hits
    one.close()
    # The engine checked the shard's own config (from the spec) and wrote the pool size back.
    assert json.loads(config.read_text())["max_search_threads"] == 1
    with pytest.raises(ValueError, match="search_threads"):
        EdgeStore(root, search_threads=0)
