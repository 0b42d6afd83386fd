from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from indexer.pipeline import Retry, index_files
from indexer.planning import FilterFields, IndexingError
from indexer.reader import Document, Rejected, read_documents
from models.loading import load_encoder
from store.base import DocumentPoint, VectorStore
from store.errors import StoreError, StoreUnavailable
from store.factory import open_store
from store.filters import Condition, Filter, Range
from store.sparse import Bm25Encoder
from tests.store_doubles import DelegatingStore

GOOD = [
    {"_id": "d1", "title": "", "text": "高血压病人可以口服党参", "metadata": {"department": "心血管科"}},
    {"_id": "d2", "title": "感冒", "text": "感冒发烧多喝水，注意休息", "metadata": {"department": "呼吸科"}},
    {"id": "d3", "text": "糖尿病患者饮食要控制糖分"},
]


def write_jsonl(path: Path, rows: Sequence[object]) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


@pytest.fixture()
def encoder(tiny_bert: Path):
    return load_encoder(tiny_bert, threads=1)


@pytest.fixture()
def store(tmp_path: Path):
    s = open_store(None, tmp_path / "qdrant")
    yield s
    s.close()


def test_reader_reports_file_and_line_for_each_bad_line(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            GOOD[0],
            "{not json",
            "[1, 2]",
            {"_id": "x"},
            {"_id": "y", "text": "   "},
            {"_id": "z", "text": "ok", "metadata": "nope"},
            {"text": "no id"},
            GOOD[2],
        ],
    )
    with path.open("ab") as fh:
        fh.write(b'{"_id": "bad-utf8", "text": "\xff"}\n')
    items = list(read_documents(path))
    assert [type(i).__name__ for i in items] == ["Document"] + ["Rejected"] * 6 + ["Document", "Rejected"]
    rejected = [i for i in items if isinstance(i, Rejected)]
    assert [r.line for r in rejected] == [2, 3, 4, 5, 6, 7, 9]
    assert str(rejected[0]).startswith(f"{path}:2: invalid JSON")
    assert "'text'" in rejected[2].reason
    assert "'metadata'" in rejected[4].reason
    assert "'id'" in rejected[5].reason
    assert "UTF-8" in rejected[6].reason
    doc = items[-2]
    assert isinstance(doc, Document) and doc.doc_id == "d3" and doc.source == f"{path}:8"


def test_index_search_and_rerun_skips_unchanged(tmp_path: Path, encoder, store: VectorStore) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", GOOD)
    first = index_files([corpus], encoder, store, "c", fields=FilterFields(keyword=("department",)))
    assert (first.indexed, first.skipped, first.ok) == (3, 0, True)
    assert store.count("c") == 3
    spec = store.get_collection("c")
    assert (
        spec is not None and spec.space == encoder.manifest.space and spec.keyword_fields == ("department",)
    )

    vector = encoder.encode(["感冒\n感冒发烧多喝水，注意休息"])[0]
    assert store.search("c", vector, 1)[0].doc_id == "d2"

    second = index_files([corpus], encoder, store, "c")
    assert (second.indexed, second.skipped) == (0, 3)
    assert store.count("c") == 3

    changed = [GOOD[0], {**GOOD[1], "text": "感冒了要多休息"}, GOOD[2]]
    third = index_files([write_jsonl(tmp_path / "corpus.jsonl", changed)], encoder, store, "c")
    assert (third.indexed, third.skipped) == (1, 2)
    assert store.count("c") == 3


def test_rejects_are_written_and_good_lines_still_indexed(
    tmp_path: Path, encoder, store: VectorStore
) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [GOOD[0], "oops", GOOD[1], GOOD[0]])
    rejects = tmp_path / "rejects.jsonl"
    summary = index_files([corpus], encoder, store, "c", rejects_path=rejects)
    assert summary.indexed == 2 and not summary.ok
    lines = [json.loads(x) for x in rejects.read_text(encoding="utf-8").splitlines()]
    assert [x["source"] for x in lines] == [f"{corpus}:2", f"{corpus}:4"]
    assert "duplicate id 'd1'" in lines[1]["reason"] and f"{corpus}:1" in lines[1]["reason"]


class FlakyStore(DelegatingStore):
    """Fails the first ``failures`` upserts, then delegates."""

    def __init__(self, inner: VectorStore, failures: int) -> None:
        super().__init__(inner)
        self.failures = failures

    def upsert(self, name: str, points: Sequence[DocumentPoint]) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("connection refused")
        self.inner.upsert(name, points)


def test_a_failed_batch_is_retried(tmp_path: Path, encoder, store: VectorStore) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", GOOD)
    flaky = FlakyStore(store, failures=2)
    summary = index_files([corpus], encoder, flaky, "c", retry=Retry(3, 0))  # type: ignore[arg-type]
    assert summary.ok and summary.indexed == 3


def test_a_batch_that_keeps_failing_is_reported_not_dropped(
    tmp_path: Path, encoder, store: VectorStore
) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", GOOD)
    rejects = tmp_path / "rejects.jsonl"
    flaky = FlakyStore(store, failures=100)
    summary = index_files(
        [corpus],
        encoder,
        flaky,
        "c",
        retry=Retry(2, 0),  # type: ignore[arg-type]
        rejects_path=rejects,
    )
    assert not summary.ok and sorted(summary.failed) == ["d1", "d2", "d3"]
    assert "StoreUnavailable" in rejects.read_text(encoding="utf-8")
    # Nothing was marked done: the next run indexes them.
    assert index_files([corpus], encoder, store, "c").indexed == 3


def test_collection_of_another_space_is_refused(
    tmp_path: Path, encoder, store: VectorStore, tiny_gemma: Path
) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", GOOD)
    index_files([corpus], encoder, store, "c")
    other = load_encoder(tiny_gemma, threads=1)
    with pytest.raises(IndexingError, match="holds vectors of"):
        index_files([corpus], other, store, "c")


def test_query_encoder_cannot_index(tmp_path: Path, tiny_onnx: Path, store: VectorStore) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", GOOD)
    with pytest.raises(IndexingError, match="query encoder"):
        index_files([corpus], load_encoder(tiny_onnx), store, "c")


def test_point_vectors_match_the_encoder(tmp_path: Path, encoder, store: VectorStore) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", GOOD[:1])
    index_files([corpus], encoder, store, "c")
    vector = encoder.encode([GOOD[0]["text"]])[0]
    hit = store.search("c", vector, 1)[0]
    assert hit.score == pytest.approx(1.0, abs=1e-4)
    assert hit.metadata == {"department": "心血管科"}
    assert np.isfinite(hit.score)


def test_declared_filter_fields_are_typed_and_filterable(tmp_path: Path, encoder, store: VectorStore) -> None:
    rows = [
        {
            "_id": "a",
            "text": "高血压",
            "metadata": {"year": 2019, "updated": "2024-05-01", "dept": "心血管科"},
        },
        {"_id": "b", "text": "感冒", "metadata": {"year": 2023, "updated": "2024-05-01T08:00:00Z"}},
        {"_id": "c", "text": "糖尿病", "metadata": {"year": "2021"}},
        {"_id": "d", "text": "哮喘", "metadata": {"updated": "yesterday"}},
        {"_id": "e", "text": "头痛", "metadata": {"dept": 7}},
        {"_id": "f", "text": "发烧"},
    ]
    corpus = write_jsonl(tmp_path / "typed.jsonl", rows)
    fields = FilterFields(keyword=("dept",), integer=("year",), date=("updated",))
    summary = index_files([corpus], encoder, store, "c", fields=fields)
    assert summary.indexed == 3
    assert [(r.line, r.reason.split(" ")[0]) for r in summary.rejected] == [
        (3, "metadata.year"),
        (4, "metadata.updated"),
        (5, "metadata.dept"),
    ]
    spec = store.get_collection("c")
    assert spec is not None and (spec.keyword_fields, spec.integer_fields, spec.date_fields) == (
        ("dept",),
        ("year",),
        ("updated",),
    )
    recent = Filter(must=[Condition(key="year", range=Range(gte=2020))])
    assert [h.doc_id for h in store.search("c", encoder.encode(["感冒"])[0], 10, filters=recent)] == ["b"]
    # A rerun without declarations keeps the collection's; a conflicting declaration is refused.
    assert index_files([corpus], encoder, store, "c").skipped == 3
    with pytest.raises(IndexingError, match="filter fields"):
        index_files([corpus], encoder, store, "c", fields=FilterFields(keyword=("dept", "year")))
    with pytest.raises(IndexingError, match="more than one type"):
        index_files([corpus], encoder, store, "d", fields=FilterFields(keyword=("year",), integer=("year",)))


def test_sparse_bm25_index_serves_hybrid_search(tmp_path: Path, encoder, store: VectorStore) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", GOOD)
    summary = index_files([corpus], encoder, store, "c", sparse=True)
    assert summary.indexed == 3
    spec = store.get_collection("c")
    assert spec is not None and spec.sparse is not None
    assert 2 <= spec.sparse.avg_len <= 10  # measured on the three short documents
    bm25 = Bm25Encoder(spec.sparse)
    away = -encoder.encode(["党参"])[0]
    assert store.search("c", away, 1, sparse=bm25.query("党参"))[0].doc_id == "d1"
    # Reruns keep the collection's BM25 spec (the average length is not re-measured).
    assert index_files([corpus], encoder, store, "c").skipped == 3
    assert store.get_collection("c") == spec
    with pytest.raises(IndexingError, match="no BM25 vectors"):
        index_files([corpus], encoder, store, "c", sparse=False)
    index_files([corpus], encoder, store, "dense-only")
    with pytest.raises(IndexingError, match="with BM25 vectors"):
        index_files([corpus], encoder, store, "dense-only", sparse=True)


def test_ids_are_taken_exactly_as_written(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "ids.jsonl",
        [
            {"id": "1", "text": "a"},
            {"id": 1, "text": "b"},
            {"id": " 1", "text": "c"},
            {"_id": "1 ", "text": "d"},
            {"id": True, "text": "e"},
        ],
    )
    items = list(read_documents(path))
    assert isinstance(items[0], Document) and items[0].doc_id == "1"
    reasons = [i.reason for i in items[1:] if isinstance(i, Rejected)]
    assert len(reasons) == 4
    assert "must be a string, got int 1" in reasons[0]
    assert "whitespace" in reasons[1] and "whitespace" in reasons[2]
    assert "got bool true" in reasons[3]


def test_rejects_file_is_private_durable_and_never_an_input(
    tmp_path: Path, encoder, store: VectorStore
) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [GOOD[0], "{broken", *(f"[{i}]" for i in range(24))])
    before = corpus.read_bytes()
    with pytest.raises(IndexingError, match="one of the inputs"):
        index_files([corpus], encoder, store, "c", rejects_path=tmp_path / "." / "corpus.jsonl")
    assert corpus.read_bytes() == before  # not emptied
    rejects = tmp_path / "rejects.jsonl"
    rejects.write_text("stale\n")
    rejects.chmod(0o644)
    summary = index_files([corpus], encoder, store, "c", rejects_path=rejects)
    assert (rejects.stat().st_mode & 0o777) == 0o600
    lines = rejects.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 25 and "stale" not in lines
    # Memory stays flat with a bad input: 20 samples without their text, the count of all.
    assert summary.rejected_count == 25 and len(summary.rejected) == 20
    assert all(r.raw == "" for r in summary.rejected)
    assert not summary.ok


def test_duplicate_ids_name_the_first_file_and_line(tmp_path: Path, encoder, store: VectorStore) -> None:
    first = write_jsonl(tmp_path / "a.jsonl", [GOOD[1], GOOD[0]])
    second = write_jsonl(tmp_path / "b.jsonl", [GOOD[0]])
    summary = index_files([first, second], encoder, store, "c")
    (duplicate,) = summary.rejected
    assert (duplicate.path, duplicate.line) == (second, 1)
    assert duplicate.reason == f"duplicate id 'd1' (first at {first}:2)"


class PoisonedEncoder:
    """The real encoder, except that a text containing a marker yields NaN or makes the batch raise."""

    def __init__(self, inner, nan: str = "NAN-DOC", boom: str = "BOOM-DOC") -> None:
        self.inner, self.nan, self.boom = inner, nan, boom
        self.manifest = inner.manifest
        self.calls = 0

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        self.calls += 1
        if any(self.boom in t for t in texts):
            raise RuntimeError("tokenizer exploded")
        vectors = self.inner.encode(texts, batch_size=batch_size).copy()
        for i, text in enumerate(texts):
            if self.nan in text:
                vectors[i] = np.nan
        return vectors


def test_one_bad_document_fails_alone_on_every_run(tmp_path: Path, encoder, store: VectorStore) -> None:
    rows = [*GOOD, {"id": "nan", "text": "NAN-DOC here"}, {"id": "boom", "text": "BOOM-DOC here"}]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", rows)
    rejects = tmp_path / "rejects.jsonl"
    poisoned = PoisonedEncoder(encoder)
    summary = index_files([corpus], poisoned, store, "c", rejects_path=rejects)  # type: ignore[arg-type]
    assert summary.indexed == 3 and sorted(summary.failed) == ["boom", "nan"]
    reasons = {json.loads(x)["id"]: json.loads(x)["reason"] for x in rejects.read_text().splitlines()}
    assert reasons == {"nan": "encoder produced NaN or infinity", "boom": reasons["boom"]}
    assert "tokenizer exploded" in reasons["boom"]
    again = index_files([corpus], poisoned, store, "c")  # type: ignore[arg-type]
    assert (again.indexed, again.skipped, sorted(again.failed)) == (0, 3, ["boom", "nan"])


class CountingStore(DelegatingStore):
    """Delegates; ``upsert_error`` / ``lookup_failures`` make those calls fail; counts calls."""

    def __init__(self, inner: VectorStore, upsert_error: Exception | None = None, lookup_failures: int = 0):
        super().__init__(inner)
        self.upsert_error, self.lookup_failures = upsert_error, lookup_failures
        self.upserts = self.lookups = self.creates = 0

    def create_collection(self, name: str, spec, bulk: bool = False) -> None:
        self.creates += 1
        self.inner.create_collection(name, spec, bulk)

    def content_hashes(self, name: str, doc_ids: Sequence[str]) -> dict[str, str]:
        self.lookups += 1
        if self.lookup_failures > 0:
            self.lookup_failures -= 1
            raise StoreUnavailable("timed out")
        return self.inner.content_hashes(name, doc_ids)

    def upsert(self, name: str, points: Sequence[DocumentPoint]) -> None:
        self.upserts += 1
        if self.upsert_error is not None:
            raise self.upsert_error
        self.inner.upsert(name, points)


def test_refusals_are_not_retried_and_lookups_are(tmp_path: Path, encoder, store: VectorStore) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", GOOD)
    refusing = CountingStore(store, upsert_error=StoreError("payload too large"))
    summary = index_files([corpus], encoder, refusing, "c", retry=Retry(3, 0))  # type: ignore[arg-type]
    assert refusing.upserts == 1 and sorted(summary.failed) == ["d1", "d2", "d3"]
    flaky_lookup = CountingStore(store, lookup_failures=2)
    summary = index_files([corpus], encoder, flaky_lookup, "c", retry=Retry(3, 0))  # type: ignore[arg-type]
    assert summary.ok and summary.indexed == 3 and flaky_lookup.lookups == 3


def test_every_run_completes_the_collection(tmp_path: Path, encoder, store: VectorStore) -> None:
    # An interrupted creation (e.g. a server collection without its payload indexes) is repaired by
    # the next run, because every run asks the store to create the collection (idempotent).
    corpus = write_jsonl(tmp_path / "corpus.jsonl", GOOD)
    counting = CountingStore(store)
    index_files([corpus], encoder, counting, "c")  # type: ignore[arg-type]
    index_files([corpus], encoder, counting, "c")  # type: ignore[arg-type]
    assert counting.creates == 2
