"""Reindexing as a batch job sees it: blue/green versions behind an alias, validation, rollback,
resume after a real SIGKILL, incremental runs with deletes, sharded workers, and search traffic that
never fails while the alias switches."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from indexer.build import ExitCode, RunOptions, full_build, incremental
from indexer.pipeline import DeleteGuard, Partition
from indexer.reader import resolve_inputs, spool_stdin
from indexer.versions import rollback, served, versions
from models.manifest import ModelManifest
from service.app import create_app
from service.state import ServingState
from settings import Settings
from store.base import VectorStore
from store.edge import EdgeStore
from store.errors import StoreError
from store.factory import open_store
from tests.store_doubles import DelegatingStore
from tests.test_service import HashEncoder, running

SPACE = "test-space"
DIM = 16
ALIAS = "medsearch"


class HashDocuments(HashEncoder):
    """The document side of HashEncoder: the same text gets the same vector on both sides, so a
    query equal to a document's text finds it first. Counts what it encodes."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__(SPACE, DIM)
        self.manifest = ModelManifest(
            name="hash-documents",
            role="document",
            format="hf",
            architecture="HashEncoder",
            pooling="mean",
            max_tokens=512,
            dim=DIM,
            space=SPACE,
            fingerprint="d" * 64,
        )
        self.encoded: list[str] = []
        self.delay_s = delay_s

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        self.encoded.extend(texts)
        time.sleep(self.delay_s * len(texts))
        return super().encode(texts, batch_size)


def corpus(path: Path, n: int, changed: Sequence[int] = (), start: int = 0) -> Path:
    rows = []
    for i in range(start, start + n):
        text = f"文档 {i} 的内容" + (" (修订)" if i in changed else "")
        rows.append(json.dumps({"_id": f"d{i}", "title": "", "text": text}, ensure_ascii=False))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(params=["edge", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    s = open_store(None if request.param == "edge" else ":memory:", tmp_path / "qdrant")
    yield s
    s.close()


def snapshot(store: VectorStore, name: str) -> dict[str, tuple[str, tuple[float, ...]]]:
    """doc_id -> (content hash, rounded vector): what "the same collection" means."""
    ids = sorted(store.document_ids(name))
    hashes = store.content_hashes(name, ids)
    vectors = store.vectors(name, ids)
    return {d: (hashes[d], tuple(np.round(vectors[d], 5))) for d in ids}


def test_full_builds_switch_the_alias_resume_and_roll_back(tmp_path: Path, store: VectorStore) -> None:
    encoder = HashDocuments()
    first = full_build([corpus(tmp_path / "a.jsonl", 40)], encoder, store, ALIAS, RunOptions(keep=2))
    assert (first.exit_code, first.switched, first.indexed, first.resumed) == (0, True, 40, False)
    assert first.validation is not None and first.validation["count"] == 40
    assert served(store, ALIAS) == first.collection == f"{ALIAS}--v0001-{first.collection[-8:]}"

    # The same input again is the same build, already served: nothing to do.
    encoder.encoded.clear()
    again = full_build([tmp_path / "a.jsonl"], encoder, store, ALIAS, RunOptions(keep=2))
    assert (again.collection, again.up_to_date, encoder.encoded) == (first.collection, True, [])

    second = full_build(
        [corpus(tmp_path / "b.jsonl", 30, changed=[3])], encoder, store, ALIAS, RunOptions(keep=2)
    )
    assert second.switched and second.switched_from == first.collection
    assert store.count(ALIAS) == 30
    third = full_build([corpus(tmp_path / "c.jsonl", 20)], encoder, store, ALIAS, RunOptions(keep=2))
    assert third.pruned == [first.collection]  # keep 2: the served one and the one before it
    assert [v.name for v in versions(store, ALIAS)] == [second.collection, third.collection]

    assert rollback(store, ALIAS) == (third.collection, second.collection)
    assert store.count(ALIAS) == 30
    hit = store.search(ALIAS, HashEncoder(SPACE, DIM).encode(["文档 3 的内容 (修订)"])[0], 1)[0]
    assert (hit.doc_id, round(hit.score, 4)) == ("d3", 1.0)


def test_a_build_with_rejects_or_failures_is_not_served(tmp_path: Path, store: VectorStore) -> None:
    good = corpus(tmp_path / "a.jsonl", 10)
    assert full_build([good], HashDocuments(), store, ALIAS, RunOptions()).switched
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text(encoding="utf-8") + "{broken\n", encoding="utf-8")
    report = full_build([bad], HashDocuments(), store, ALIAS, RunOptions())
    assert (report.exit_code, report.switched, report.rejected) == (ExitCode.INPUT, False, 1)
    assert served(store, ALIAS) != report.collection
    accepted = full_build([bad], HashDocuments(), store, ALIAS, RunOptions(accept_rejects=True))
    assert accepted.switched and served(store, ALIAS) == report.collection


def test_validation_refuses_a_collection_missing_documents(tmp_path: Path, store: VectorStore) -> None:
    class Losing(DelegatingStore):
        """A store that acknowledges upserts of d7 and drops them (what validation is for)."""

        def upsert(self, name, points) -> None:
            self.inner.upsert(name, [p for p in points if p.doc_id != "d7"])

    report = full_build(
        [corpus(tmp_path / "a.jsonl", 10)], HashDocuments(), Losing(store), ALIAS, RunOptions()
    )  # type: ignore[arg-type]
    assert (report.exit_code, report.switched) == (ExitCode.REFUSED, False)
    assert "holds 9 documents; the input has 10" in (report.error or "")
    assert served(store, ALIAS) is None


def test_switching_to_another_space_needs_consent(tmp_path: Path, store: VectorStore) -> None:
    path = corpus(tmp_path / "a.jsonl", 5)
    assert full_build([path], HashDocuments(), store, ALIAS, RunOptions()).switched
    other = HashDocuments()
    other.manifest = other.manifest.model_copy(update={"space": "other-space"})
    refused = full_build([path], other, store, ALIAS, RunOptions())
    assert refused.exit_code == ExitCode.REFUSED and "--allow-space-change" in (refused.error or "")
    assert full_build([path], other, store, ALIAS, RunOptions(allow_space_change=True)).switched


def test_incremental_touches_only_changed_documents_and_guards_deletes(
    tmp_path: Path, store: VectorStore
) -> None:
    encoder = HashDocuments()
    full_build([corpus(tmp_path / "a.jsonl", 20)], encoder, store, ALIAS, RunOptions())
    before = snapshot(store, ALIAS)
    # d3 changed, d19 gone, d20 new.
    path = corpus(tmp_path / "b.jsonl", 20, changed=[3], start=0)
    lines = path.read_text(encoding="utf-8").splitlines()[:19]
    lines.append(json.dumps({"_id": "d20", "text": "文档 20 的内容"}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    encoder.encoded.clear()
    report = incremental([path], encoder, store, ALIAS, RunOptions())
    assert (report.exit_code, report.indexed, report.skipped, report.deleted) == (0, 2, 18, 1)
    assert sorted(encoder.encoded) == ["文档 20 的内容", "文档 3 的内容 (修订)"]
    after = snapshot(store, ALIAS)
    assert set(after) == set(before) - {"d19"} | {"d20"}
    assert {d for d in after if d in before and after[d] != before[d]} == {"d3"}

    # An empty (or truncated) input would delete most of the index: refused, nothing deleted.
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    refused = incremental([empty], encoder, store, ALIAS, RunOptions())
    assert refused.exit_code == ExitCode.REFUSED and "nothing deleted" in (refused.error or "")
    assert store.count(ALIAS) == 20
    meant = incremental([empty], encoder, store, ALIAS, RunOptions(delete_guard=DeleteGuard(1.0)))
    assert (meant.exit_code, meant.deleted, store.count(ALIAS)) == (0, 20, 0)


def test_two_shard_workers_and_a_final_run_equal_a_single_build(tmp_path: Path) -> None:
    path = corpus(tmp_path / "a.jsonl", 60)
    single = open_store(":memory:", tmp_path)
    sharded = open_store(":memory:", tmp_path)
    try:
        whole = full_build([path], HashDocuments(), single, ALIAS, RunOptions())
        workers = [HashDocuments(), HashDocuments()]
        reports = []
        threads = [
            threading.Thread(
                target=lambda i=i: reports.append(
                    full_build([path], workers[i], sharded, ALIAS, RunOptions(partition=Partition(i, 2)))
                )
            )
            for i in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r.mode for r in reports) == ["shard", "shard"] and not any(r.switched for r in reports)
        assert sum(r.indexed for r in reports) == 60 and all(0 < r.indexed < 60 for r in reports)
        assert len({r.collection for r in reports}) == 1 and served(sharded, ALIAS) is None
        final = full_build([path], HashDocuments(), sharded, ALIAS, RunOptions())
        assert (final.resumed, final.indexed, final.skipped, final.switched) == (True, 0, 60, True)
        assert snapshot(sharded, ALIAS) == snapshot(single, whole.collection)
    finally:
        single.close()
        sharded.close()


KILLED_RUN = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.test_index_build import HashDocuments
from indexer.build import RunOptions, full_build
from store.factory import open_store

class Marking(HashDocuments):
    def encode(self, texts, batch_size=32):
        out = super().encode(texts, batch_size)
        with open({marks!r}, "a") as fh:
            fh.write(f"{{len(texts)}}\\n")
        return out

store = open_store(None, Path({root!r}))
full_build([Path({path!r})], Marking(delay_s=0.01), store, "medsearch", RunOptions(batch_size=8))
"""


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    path = corpus(tmp_path / "a.jsonl", 300)
    marks = tmp_path / "marks"
    script = KILLED_RUN.format(
        repo=str(Path(__file__).resolve().parents[1]),
        marks=str(marks),
        root=str(tmp_path / "killed"),
        path=str(path),
    )
    worker = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    # Killed once it has written a few chunks (64 documents each) and is inside another.
    while time.monotonic() < deadline and (not marks.exists() or len(marks.read_text().split()) < 3):
        assert worker.poll() is None, "the indexing run ended before it could be killed"
        time.sleep(0.01)
    os.kill(worker.pid, signal.SIGKILL)
    assert worker.wait() == -signal.SIGKILL
    killed = EdgeStore(tmp_path / "killed")
    try:
        partial = killed.count(versions(killed, ALIAS)[0].name)
        assert 0 < partial < 300 and served(killed, ALIAS) is None
        encoder = HashDocuments()
        resumed = full_build([path], encoder, killed, ALIAS, RunOptions(batch_size=8))
        assert (resumed.resumed, resumed.skipped, resumed.indexed) == (True, partial, 300 - partial)
        assert len(encoder.encoded) == 300 - partial
        clean = EdgeStore(tmp_path / "clean")
        try:
            whole = full_build([path], HashDocuments(), clean, ALIAS, RunOptions(batch_size=8))
            assert resumed.collection == whole.collection
            assert snapshot(killed, ALIAS) == snapshot(clean, ALIAS)
        finally:
            clean.close()
    finally:
        killed.close()


async def test_alias_switch_under_search_traffic_fails_no_request(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, collection=ALIAS, query_model="hash-query", spec_refresh_s=0.02)
    indexer_store = EdgeStore(settings.store_path)
    first = corpus(tmp_path / "a.jsonl", 30)
    assert full_build([first], HashDocuments(), indexer_store, ALIAS, RunOptions()).switched
    service_store = EdgeStore(settings.store_path)  # the service's own handle, as in its own process
    state = ServingState(settings=settings, encoder=HashEncoder(SPACE, DIM), store=service_store)
    statuses: list[int] = []
    answers: list[str] = []
    builds = [corpus(tmp_path / f"{n}.jsonl", 30, changed=[3, 5, 7][:n]) for n in (1, 2, 3)]
    async with running(create_app(settings, state)) as client:
        done = asyncio.Event()

        async def traffic() -> None:
            while not done.is_set():
                response = await client.post("/v1/search", json={"query": "文档 3 的内容 (修订)", "top_k": 3})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    answers.append(response.json()["hits"][0]["text"])

        async def reindex() -> None:
            for path in builds:  # three switches; with keep 2 the first version is deleted meanwhile
                report = await asyncio.to_thread(
                    full_build, [path], HashDocuments(delay_s=0.001), indexer_store, ALIAS, RunOptions(keep=2)
                )
                assert report.switched, report.error
                await asyncio.sleep(0.1)
            done.set()

        await asyncio.gather(traffic(), traffic(), traffic(), reindex())
        info = (await client.get("/info")).json()["collection"]
        assert info["version"] == served(indexer_store, ALIAS) and info["points"] == 30
    indexer_store.close()
    assert len(statuses) > 50 and set(statuses) == {200}
    # The revised document exists only in the new versions: found once they are served.
    assert answers[0] != "文档 3 的内容 (修订)" and answers[-1] == "文档 3 的内容 (修订)"


def test_inputs_directories_gzip_and_stdin(tmp_path: Path, store: VectorStore) -> None:
    import gzip
    import io

    folder = tmp_path / "in"
    folder.mkdir()
    corpus(folder / "a.jsonl", 3)
    plain = corpus(tmp_path / "b.jsonl", 3, start=3)
    (folder / "sub").mkdir()
    with gzip.open(folder / "sub" / "b.jsonl.gz", "wb") as fh:
        fh.write(plain.read_bytes())
    (folder / "notes.txt").write_text("not an input", encoding="utf-8")
    spooled = spool_stdin(tmp_path, io.BytesIO(corpus(tmp_path / "c.jsonl", 2, start=6).read_bytes()))
    assert oct(spooled.stat().st_mode & 0o777) == "0o600"
    paths = [*resolve_inputs([str(folder)]), spooled]
    assert [p.name for p in paths[:2]] == ["a.jsonl", "b.jsonl.gz"]
    report = full_build(paths, HashDocuments(), store, ALIAS, RunOptions())
    assert (report.exit_code, report.indexed) == (0, 8)
    assert sorted(store.document_ids(ALIAS)) == sorted(f"d{i}" for i in range(8))


@pytest.mark.parametrize(
    "change",
    [{"prompt": "document: {text}"}, {"pooling": "cls"}, {"max_tokens": 32}, {"normalize": False}],
)
def test_a_changed_manifest_is_a_new_encoding_not_unchanged_documents(
    tmp_path: Path, tiny_bert: Path, change: dict[str, object]
) -> None:
    import shutil

    from models.loading import load_encoder
    from models.manifest import read_manifest, write_manifest

    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    path = corpus(tmp_path / "a.jsonl", 12)
    store = open_store(":memory:", tmp_path)
    first = full_build([path], load_encoder(model), store, ALIAS, RunOptions())
    assert first.switched
    before = read_manifest(model)
    write_manifest(model, before.model_copy(update=change))
    after = read_manifest(model)
    assert after.fingerprint == before.fingerprint  # the same weights
    assert after.encoding_fingerprint != before.encoding_fingerprint
    # In place, the old vectors would pass for current: refused.
    refused = incremental([path], load_encoder(model), store, ALIAS, RunOptions())
    assert refused.exit_code == ExitCode.REFUSED and "encoding_fingerprint" in (refused.error or "")
    # A full build encodes every document anew into a version of its own.
    rebuilt = full_build([path], load_encoder(model), store, ALIAS, RunOptions())
    assert (rebuilt.switched, rebuilt.indexed, rebuilt.skipped) == (True, 12, 0)
    assert rebuilt.collection != first.collection
    store.close()


def test_encoding_fingerprint_ignores_what_does_not_shape_a_vector() -> None:
    manifest = HashDocuments().manifest
    same = manifest.model_copy(update={"name": "renamed", "card": "x.md", "figures": {"a": 1.0}})
    assert same.encoding_fingerprint == manifest.encoding_fingerprint


def test_progress_logs_rate_and_eta_off_a_terminal() -> None:
    import io

    from indexer.progress import Progress

    out = io.StringIO()
    progress = Progress(total=200, interval_s=0.0, label="indexing into medsearch", out=out)
    assert progress.line(50, 40, elapsed=10.0) == (
        "indexing into medsearch: 50/200 lines (25%), 40 encoded, 5.0 docs/s, ETA 00:00:30"
    )
    progress.update(200, 180)
    assert out.getvalue().startswith("indexing into medsearch: 200/200 lines (100%), 180 encoded")


def test_a_plain_collection_of_the_alias_name_is_updated_in_place_not_replaced(
    tmp_path: Path, store: VectorStore
) -> None:
    from indexer.pipeline import index_files

    path = corpus(tmp_path / "a.jsonl", 5)
    assert index_files([path], HashDocuments(), store, ALIAS).ok  # indexed before versioned builds
    refused = full_build([path], HashDocuments(), store, ALIAS, RunOptions())
    assert refused.exit_code == ExitCode.REFUSED and "--incremental" in (refused.error or "")
    assert store.list_collections() == [ALIAS]
    updated = incremental([corpus(path, 5, changed=[1])], HashDocuments(), store, ALIAS, RunOptions())
    assert (updated.exit_code, updated.collection, updated.indexed, updated.skipped) == (0, ALIAS, 1, 4)


def test_long_documents_are_chunked_and_come_back_once_with_their_best_chunk(
    tmp_path: Path, tiny_bert: Path, store: VectorStore
) -> None:
    from models.loading import load_encoder

    encoder = load_encoder(tiny_bert)
    budget = encoder.text_budget  # type: ignore[attr-defined]
    sentences = [
        f"第{i}句讲的是{topic}。" for i, topic in enumerate(["高血压", "糖尿病", "哮喘", "偏头痛"] * 20)
    ]
    long_text = "".join(sentences)
    rows = [
        {"_id": "long", "title": "综合", "text": long_text},
        {"_id": "short", "text": "感冒发烧多喝水"},
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    report = full_build([path], encoder, store, ALIAS, RunOptions(chunk_overlap=8))
    assert report.switched, report.error
    spec = store.get_collection(ALIAS)
    assert spec is not None and spec.chunking is not None and spec.chunking.max_tokens == budget
    assert report.indexed == 2 and store.count(ALIAS) > 3  # points are chunks
    assert sorted(store.document_ids(ALIAS)) == ["long", "short"]
    # A query equal to one chunk's encoded text finds that chunk, and the document only once.
    from indexer.chunking import split_text

    chunks = split_text(f"综合\n{long_text}", encoder.token_spans, budget, 8)  # type: ignore[attr-defined]
    target = chunks[2]
    hits = store.search(ALIAS, encoder.encode([target.text])[0], 5)
    assert [h.doc_id for h in hits] == ["long", "short"]
    assert (hits[0].chunk, hits[0].text, round(hits[0].score, 4)) == (2, target.text, 1.0)
    # The title is not repeated inside the first chunk's text.
    first = store.search(ALIAS, encoder.encode([chunks[0].text])[0], 1)[0]
    assert (first.chunk, first.title, first.text) == (0, "综合", chunks[0].text.removeprefix("综合\n"))
    # Unchanged on a rerun; a shorter document leaves no stale chunks behind (incremental).
    rows[0]["text"] = sentences[0]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    updated = incremental([path], encoder, store, ALIAS, RunOptions())
    assert (updated.exit_code, updated.indexed, updated.skipped) == (0, 1, 1)
    assert store.count(ALIAS) == 2


def test_disk_full_or_permission_errors_are_reported_and_the_served_version_untouched(
    tmp_path: Path,
) -> None:
    import errno

    root = tmp_path / "q"
    store = EdgeStore(root)
    first = full_build([corpus(tmp_path / "a.jsonl", 10)], HashDocuments(), store, ALIAS, RunOptions())
    served_before = snapshot(store, ALIAS)

    class DiskFull(DelegatingStore):
        """The engine's writes fail as a full disk makes them fail."""

        def upsert(self, name, points) -> None:
            raise StoreError(f"upsert into {name!r}: {os.strerror(errno.ENOSPC)}")

    full = full_build(
        [corpus(tmp_path / "b.jsonl", 12)], HashDocuments(), DiskFull(store), ALIAS, RunOptions()
    )  # type: ignore[arg-type]
    assert (full.switched, full.failed) == (False, 12) and full.exit_code == ExitCode.RETRY
    assert served(store, ALIAS) == first.collection and snapshot(store, ALIAS) == served_before
    store.close()

    # A data directory the job may not write (simulated: the tests may run as root, which chmod
    # does not stop): refused before anything is touched.
    class ReadOnly(DiskFull):
        def create_collection(self, name, spec, bulk=False) -> None:
            raise StoreError(f"cannot create collection {name!r} in {root}: {os.strerror(errno.EACCES)}")

    reopened = EdgeStore(root)
    report = full_build(
        [corpus(tmp_path / "c.jsonl", 3)], HashDocuments(), ReadOnly(reopened), ALIAS, RunOptions()
    )  # type: ignore[arg-type]
    assert (report.exit_code, report.switched) == (ExitCode.REFUSED, False)
    assert "Permission denied" in (report.error or "")
    assert served(reopened, ALIAS) == first.collection and snapshot(reopened, ALIAS) == served_before
    reopened.close()
