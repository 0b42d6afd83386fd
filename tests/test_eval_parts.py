"""The pieces of `medsearch eval` on hand-made data: configuration discovery from manifests, BEIR
loading, BM25, reranking candidates, STS files, the document-vector cache and /info parsing."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from evaluation.beir import BeirQuery, BeirSplit, DatasetError, iter_corpus, load_split
from evaluation.blackbox import ServiceError, served_pair
from evaluation.configs import (
    BuiltModel,
    ConfigError,
    discover,
    find_default,
    lineage_warnings,
    scan_models,
    select,
)
from evaluation.lexical import BM25Index, tokenize
from evaluation.metrics import RERANK_METRICS, score_run
from evaluation.rerank import build_candidates, candidate_source
from evaluation.retrieval import score_candidates
from evaluation.runner import InProcessEvaluation, Options
from evaluation.sts import load_sts, score_sts
from evaluation.vectors import Vectors, cache_dir, cached_vectors
from models.encoder import EncodeMode, Encoder
from models.manifest import MANIFEST_FILE, ModelManifest, read_manifest
from tests.conftest import SHARED_DATA

DATA = Path(__file__).with_name("data")


def write_manifest_only(models: Path, manifest: ModelManifest) -> None:
    """A model directory holding only its manifest: enough for discovery, which never loads weights."""
    (models / manifest.name).mkdir(parents=True)
    (models / manifest.name / MANIFEST_FILE).write_text(manifest.model_dump_json(), encoding="utf-8")


# --- configuration discovery --------------------------------------------------------------------


@pytest.fixture
def models_dir(
    tmp_path: Path, tiny_bert: Path, tiny_onnx: Path, tiny_gemma: Path, tiny_embedder: Path
) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    for path in (tiny_bert, tiny_onnx, tiny_gemma, tiny_embedder):
        (models / path.name).symlink_to(path)
    onnx = read_manifest(tiny_onnx)
    gemma = read_manifest(tiny_gemma)
    write_manifest_only(
        models,
        onnx.model_copy(
            update={"name": "tiny-bert-onnx-int8", "quantization": "int8", "fingerprint": "1" * 64}
        ),
    )
    # A small encoder trained into the LLM's space: derived from some other model, not from the LLM.
    write_manifest_only(
        models,
        onnx.model_copy(
            update={
                "name": "tiny-aligned",
                "space": gemma.space,
                "dim": gemma.dim,
                "derived_from": "2" * 64,
                "fingerprint": "3" * 64,
            }
        ),
    )
    write_manifest_only(models, onnx.model_copy(update={"name": "other-space", "space": "elsewhere"}))
    (models / "broken").mkdir()
    (models / "broken" / MANIFEST_FILE).write_text("{not json", encoding="utf-8")
    return models


def test_discovery_derives_configurations_from_manifests(models_dir: Path) -> None:
    models, warnings = scan_models(models_dir)
    assert [w.split(":")[0] for w in warnings] == ["skipping broken"]
    configs = discover(models)
    assert {c.name: c.kind for c in configs} == {
        "symmetric-bert:tiny-bert-onnx/tiny-bert": "symmetric-bert",
        "symmetric-bert:tiny-bert-onnx-int8/tiny-bert": "symmetric-bert",
        "asymmetric:tiny-aligned/tiny-gemma": "asymmetric",
        "symmetric-llm:tiny-gemma": "symmetric-llm",
        # Not decoder-only, but an LLM embedder with a query prompt of its own.
        "symmetric-llm:tiny-embedder": "symmetric-llm",
        "bm25": "bm25",
        "hybrid-rrf": "hybrid-rrf",
    }
    llms = {c.name: c for c in configs if c.kind == "symmetric-llm"}
    assert all(c.query == c.document for c in llms.values())  # the LLM encodes the queries too
    # The embedder's queries get its query prompt; a decoder-only LLM without one keeps its prompt.
    assert {name: c.query_mode for name, c in llms.items()} == {
        "symmetric-llm:tiny-gemma": "document",
        "symmetric-llm:tiny-embedder": "query",
    }
    assert {c.query_mode for c in configs if c.kind != "symmetric-llm"} == {"document"}
    assert lineage_warnings(models) == []


def test_query_encoder_without_lineage_is_asymmetric_and_warned(tmp_path: Path, tiny_bert: Path) -> None:
    bert = read_manifest(tiny_bert)
    (tmp_path / "tiny-bert").symlink_to(tiny_bert)
    write_manifest_only(
        tmp_path, bert.model_copy(update={"name": "old-export", "role": "query", "format": "onnx"})
    )
    models, _ = scan_models(tmp_path)
    assert [c.name for c in discover(models, lexical=False)] == ["asymmetric:old-export/tiny-bert"]
    assert [w.split(":")[0] for w in lineage_warnings(models)] == ["old-export"]


def test_default_and_selection(models_dir: Path) -> None:
    configs = discover(scan_models(models_dir)[0])
    default = find_default(configs, models_dir / "tiny-bert-onnx", models_dir / "tiny-bert")
    assert default is not None and default.name == "symmetric-bert:tiny-bert-onnx/tiny-bert"
    assert find_default(configs, models_dir / "tiny-gemma", models_dir / "tiny-gemma") is None

    assert [c.name for c in select(configs, ["default", "bm25"], default)] == [default.name, "bm25"]
    assert [c.name for c in select(configs, ["symmetric-bert"], default)] == [
        "symmetric-bert:tiny-bert-onnx/tiny-bert",
        "symmetric-bert:tiny-bert-onnx-int8/tiny-bert",
    ]
    assert len(select(configs, [], default)) == len(configs)
    # Without a default pair the hybrid has nothing to fuse.
    assert "hybrid-rrf" not in [c.name for c in select(configs, [], None)]
    with pytest.raises(ConfigError, match="no configuration 'nope'"):
        select(configs, ["nope"], default)
    with pytest.raises(ConfigError, match="no default"):
        select(configs, ["default"], None)


# --- BEIR loading -------------------------------------------------------------------------------


def write_beir(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    docs = [("d1", "高血压能吃党参吗"), ("d2", "糖尿病饮食"), ("d3", "感冒发烧咳嗽")]
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d, "title": "", "text": t}, ensure_ascii=False) + "\n" for d, t in docs),
        encoding="utf-8",
    )
    queries = [
        {"_id": "q1", "text": "党参", "metadata": {"question": "高血压病人能不能吃党参？"}},
        {"_id": "q2", "text": "糖尿病", "candidates": ["d2", "d3", "gone"]},
        {"_id": "q3", "text": "train only"},
        {"_id": "q4", "text": "咳嗽"},
    ]
    (root / "queries.jsonl").write_text(
        "\n".join(json.dumps(q, ensure_ascii=False) for q in queries) + "\n\n", encoding="utf-8"
    )
    (root / "qrels" / "dev.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq4\td3\t1\n", encoding="utf-8"
    )
    return root


def test_load_split_keeps_queries_with_qrels_in_file_order(tmp_path: Path) -> None:
    split = load_split(write_beir(tmp_path), "dev")
    assert list(split.queries) == ["q1", "q2", "q4"]
    assert split.queries["q2"].candidates == ("d2", "d3", "gone")
    assert split.queries["q1"].candidates is None
    assert list(load_split(tmp_path, "dev", max_queries=2).queries) == ["q1", "q2"]
    full = load_split(tmp_path, "dev", query_field="metadata.question", max_queries=1)
    assert full.queries["q1"].text == "高血压病人能不能吃党参？"
    with pytest.raises(DatasetError, match=r"queries.jsonl:\d+: field 'metadata.question'"):
        load_split(tmp_path, "dev", query_field="metadata.question")
    with pytest.raises(DatasetError, match=r"test.tsv not found"):
        load_split(tmp_path, "test")


def test_corpus_stream_refuses_bad_and_duplicate_lines(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="duplicate document id 'a'"):
        list(iter_corpus(path))
    path.write_text('{"_id": "a", "text": "x"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"corpus.jsonl:2"):
        list(iter_corpus(path))


# --- BM25 ---------------------------------------------------------------------------------------


def test_tokenize_cjk_unigrams_and_bigrams_and_latin_words() -> None:
    assert tokenize("高血压, Aspirin") == ["高", "血", "压", "高血", "血压", "aspirin"]


def test_bm25_ranks_the_document_sharing_the_rare_terms_first() -> None:
    index = BM25Index(
        [
            ("hbp", "高血压患者可以吃党参吗"),
            ("dm", "糖尿病患者饮食需要注意什么"),
            ("cold", "感冒发烧咳嗽怎么办"),
            ("hbp-diet", "高血压患者饮食要少盐"),
        ]
    )
    hits = index.search("高血压能吃党参吗", 10)
    assert max(hits, key=hits.__getitem__) == "hbp"
    assert "cold" not in hits  # no shared token: not a hit at all
    assert hits["hbp-diet"] > 0
    assert index.search("完全无关的词", 10) == {}
    assert set(index.score_documents("糖尿病", ["dm", "cold", "missing"])) == {"dm", "cold"}


# --- reranking candidates -----------------------------------------------------------------------


def test_candidates_from_the_dataset_or_mined_by_bm25() -> None:
    split = BeirSplit(
        root=Path("."),
        split="dev",
        queries={
            "q1": BeirQuery("q1", "高血压 党参"),
            "q2": BeirQuery("q2", "糖尿病", candidates=("d3", "d2", "gone")),
        },
        qrels={"q1": {"d1": 1}, "q2": {"d2": 1}},
    )
    bm25 = BM25Index([("d1", "高血压"), ("d2", "高血压 党参 党参"), ("d3", "高血压 饮食"), ("d4", "感冒")])
    candidates = build_candidates(split, set(bm25.doc_ids), bm25, negatives=2)
    assert candidates["q1"][0] == "d1"  # the positive, even though BM25 ranks it below d2
    assert candidates["q1"][1:] == ["d2", "d3"]  # BM25's best non-positives; d4 shares nothing
    assert candidates["q2"] == ["d3", "d2"]  # given by the dataset; ids outside the corpus dropped
    assert candidate_source(split) == "dataset+bm25-mined"
    with pytest.raises(ValueError, match="no BM25"):
        build_candidates(split, set(bm25.doc_ids), None)


def test_rerank_orders_candidates_by_cosine() -> None:
    documents = Vectors(["p", "n1", "n2"], np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32))
    query = np.array([[1.0, 0.2]], dtype=np.float32)
    run = score_candidates({"q": ["n1", "n2", "p", "missing"]}, ["q"], query, documents)
    assert set(run["q"]) == {"n1", "n2", "p"}
    assert run["q"]["p"] == pytest.approx(1 / np.hypot(1, 0.2))
    # cosine order: p (0.98), n2 (0.85), n1 (0.20) -> the positive first.
    assert score_run(run, {"q": {"p": 1}}, RERANK_METRICS)["mrr@10"] == pytest.approx(100.0)
    assert score_run(run, {"q": {"n1": 1}}, RERANK_METRICS)["map@10"] == pytest.approx(100 / 3)


# --- STS ----------------------------------------------------------------------------------------


def test_sts_plain_and_flagembedding_layouts() -> None:
    plain = load_sts(DATA / "sts-plain.jsonl")
    assert plain.layout == "plain"
    assert [p.score for p in plain.pairs] == [5.0, 4.5, 3.0, 0.0]
    flag = load_sts(DATA / "sts-flagembedding.jsonl")
    assert flag.layout == "flagembedding"
    assert [(p.sentence1, p.score) for p in flag.pairs] == [
        ("高血压能吃党参吗", 1.0),
        ("高血压能吃党参吗", 0.0),
        ("高血压能吃党参吗", 0.0),
        ("糖尿病饮食注意什么", 1.0),
        ("糖尿病饮食注意什么", 0.0),
    ]
    assert flag.sentences(1) == ["高血压能吃党参吗", "糖尿病饮食注意什么"]


@pytest.mark.skipif(not (SHARED_DATA / "care-samples").is_dir(), reason="shared data not present")
def test_care_samples_sts_file_loads() -> None:
    path = SHARED_DATA / "care-samples" / "stage2-medteb-sts.jsonl"
    sts = load_sts(path)
    assert sts.layout == "flagembedding"
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    assert len(sts.pairs) == sum(len(x["pos"]) + len(x["neg"]) for x in lines)
    assert sum(p.score for p in sts.pairs) == len(lines)  # one positive per line


def test_sts_scores_by_hand() -> None:
    sts = load_sts(DATA / "sts-plain.jsonl")
    # sentence-1 vectors all (1, 0); sentence-2 vectors at angles giving cosines 0.9, 0.8, 0.8, 0.1.
    side1 = np.tile([1.0, 0.0], (4, 1))
    side2 = np.array([[c, np.sqrt(1 - c * c)] for c in (0.9, 0.8, 0.8, 0.1)])
    scores = score_sts(sts, side1, side2)
    assert scores["pairs"] == 4
    # gold ranks 4, 3, 2, 1; predicted ranks 4, 2.5, 2.5, 1.
    rx, ry = np.array([1.5, 0.5, -0.5, -1.5]), np.array([1.5, 0.0, 0.0, -1.5])
    assert scores["spearman"] == pytest.approx(100 * rx @ ry / np.sqrt((rx @ rx) * (ry @ ry)))
    assert scores["pearson"] == pytest.approx(100 * np.corrcoef([0.9, 0.8, 0.8, 0.1], [5, 4.5, 3, 0])[0, 1])


def test_sts_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"a": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load_sts(path)
    path.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n' * 2, encoding="utf-8")
    with pytest.raises(ValueError, match="gold score"):
        load_sts(path)


# --- document-vector cache ----------------------------------------------------------------------


class CountingEncoder:
    """Deterministic vectors from the text's sha256; records every text it was asked to encode."""

    def __init__(self, fingerprint: str = "f" * 64, prompt: str = "{text}") -> None:
        self.manifest = ModelManifest(
            name="counting",
            role="document",
            format="hf",
            architecture="Fake",
            pooling="mean",
            prompt=prompt,
            max_tokens=16,
            dim=4,
            space="fake",
            fingerprint=fingerprint,
        )
        self.texts: list[str] = []

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        self.texts.extend(texts)
        return np.array(
            [np.frombuffer(hashlib.sha256(t.encode()).digest()[:16], dtype=np.float32) for t in texts]
        )


def stream(n: int) -> list[tuple[str, str]]:
    return [(f"d{i}", f"文档 {i}") for i in range(n)]


def test_cache_hit_does_not_load_the_encoder(tmp_path: Path) -> None:
    encoder = CountingEncoder()
    first = cached_vectors(
        tmp_path, encoder.manifest, "corpus-sha", lambda: iter(stream(5)), lambda: encoder, chunk=2
    )
    assert len(encoder.texts) == 5

    def must_not_load() -> CountingEncoder:
        raise AssertionError("the encoder was loaded on a cache hit")

    second = cached_vectors(tmp_path, encoder.manifest, "corpus-sha", lambda: iter(stream(5)), must_not_load)
    assert second.ids == first.ids == [f"d{i}" for i in range(5)]
    np.testing.assert_array_equal(second.matrix, first.matrix)
    # Another corpus or another prompt is another entry.
    cached_vectors(tmp_path, encoder.manifest, "other-sha", lambda: iter(stream(1)), lambda: encoder)
    prompted = CountingEncoder(prompt="passage: {text}")
    assert cache_dir(tmp_path, prompted.manifest, "corpus-sha") != cache_dir(
        tmp_path, encoder.manifest, "corpus-sha"
    )


def test_interrupted_encoding_resumes_after_the_last_complete_part(tmp_path: Path) -> None:
    class Crash(RuntimeError):
        pass

    class CrashingEncoder(CountingEncoder):
        def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
            if len(self.texts) >= 4:
                raise Crash
            return super().encode(texts, batch_size)

    crashing = CrashingEncoder()
    with pytest.raises(Crash):
        cached_vectors(tmp_path, crashing.manifest, "sha", lambda: iter(stream(7)), lambda: crashing, chunk=2)
    resumed = CountingEncoder()
    vectors = cached_vectors(
        tmp_path, resumed.manifest, "sha", lambda: iter(stream(7)), lambda: resumed, chunk=2
    )
    assert resumed.texts == ["文档 4", "文档 5", "文档 6"]  # two parts of two were already on disk
    fresh = CountingEncoder()
    expected = cached_vectors(None, fresh.manifest, "sha", lambda: iter(stream(7)), lambda: fresh)
    assert vectors.ids == expected.ids
    np.testing.assert_array_equal(vectors.matrix, expected.matrix)


def test_encoder_without_fingerprint_is_never_cached(tmp_path: Path) -> None:
    encoder = CountingEncoder(fingerprint="")
    for _ in range(2):
        cached_vectors(tmp_path, encoder.manifest, "sha", lambda: iter(stream(3)), lambda: encoder)
    assert len(encoder.texts) == 6
    assert not (tmp_path / "document-vectors").exists()


# --- the query side of a symmetric LLM -----------------------------------------------------------


def digest_vectors(texts: Sequence[str]) -> np.ndarray:
    """Finite, text-dependent (len(texts), 4) vectors."""
    return np.array(
        [np.frombuffer(hashlib.sha256(t.encode()).digest()[:4], dtype=np.uint8) + 1.0 for t in texts],
        dtype=np.float32,
    )


class PromptedEncoder:
    """Vectors of the texts as ``mode`` renders them (query prompt or prompt); records what it encoded."""

    def __init__(self, manifest: ModelManifest, mode: EncodeMode) -> None:
        self.manifest = manifest
        self.render = manifest.render_query if mode == "query" else manifest.render
        self.rendered: list[str] = []

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        rendered = [self.render(t) for t in texts]
        self.rendered.extend(rendered)
        return digest_vectors(rendered)


@pytest.mark.parametrize("query_prompt", ["query: {text}", None])
def test_symmetric_llm_queries_use_its_query_prompt_when_it_has_one(
    tmp_path: Path, query_prompt: str | None
) -> None:
    split = load_split(write_beir(tmp_path / "beir"), "dev")
    manifest = ModelManifest(
        name="llm",
        role="document",
        format="hf",
        architecture="Fake",
        decoder_only=query_prompt is None,  # an LLM embedder, or a decoder-only LLM without a query prompt
        pooling="mean",
        prompt="passage: {text}",
        query_prompt=query_prompt,
        max_tokens=16,
        dim=4,
        space="fake",
    )
    model = BuiltModel(tmp_path / "llm", manifest)
    (config,) = discover([model], lexical=False)
    assert config.kind == "symmetric-llm"
    loaded: dict[EncodeMode, PromptedEncoder] = {}

    def load(path: Path, mode: EncodeMode) -> Encoder:
        assert path == model.path and mode not in loaded  # each mode opened once
        loaded[mode] = PromptedEncoder(manifest, mode)
        return loaded[mode]

    evaluation = InProcessEvaluation(
        split=split,
        configs=[config],
        default=None,
        load=load,
        cache_root=None,
        options=Options(tasks=frozenset({"rerank"})),
    )
    (result,) = evaluation.run()
    assert result.kind == "symmetric-llm" and result.reranking is not None
    queries = [split.queries[q].text for q in split.queries]
    documents = [doc.text for doc in iter_corpus(split.corpus_path)]
    if query_prompt is None:  # as before: one encoder, the document prompt on both sides
        assert list(loaded) == ["document"]
        assert sorted(loaded["document"].rendered) == sorted(f"passage: {t}" for t in documents + queries)
        return
    assert sorted(loaded) == ["document", "query"]
    assert sorted(loaded["document"].rendered) == sorted(f"passage: {d}" for d in documents)
    assert loaded["query"].rendered == [f"query: {q}" for q in queries]
    np.testing.assert_array_equal(
        evaluation.query_vectors(model, "query"), digest_vectors([f"query: {q}" for q in queries])
    )


# --- black-box /info ----------------------------------------------------------------------------


def test_served_pair_from_info() -> None:
    info = {
        "query_encoder": {"name": "q", "fingerprint": "qf"},
        "collection": {
            "name": "medsearch",
            "points": 3,
            "spec": {"encoder": "d", "encoder_fingerprint": "df", "space": "s"},
        },
        "pairing": "symmetric",
    }
    pair = served_pair(info)
    assert (pair.name, pair.points, pair.space) == ("symmetric-bert:q/d", 3, "s")
    assert served_pair(info | {"pairing": "asymmetric"}).kind == "asymmetric"
    with pytest.raises(ServiceError, match="not read its collection"):
        served_pair(info | {"collection": {"name": "x", "points": None, "spec": None}})
    with pytest.raises(ServiceError, match="unexpected /info"):
        served_pair({"pairing": "symmetric"})


@pytest.mark.skipif(not (SHARED_DATA / "cmedqa-im").is_dir(), reason="shared data not present")
def test_shared_cmedqa_dev_split_loads_as_is() -> None:
    root = SHARED_DATA / "cmedqa-im"
    split = load_split(root, "dev")
    assert len(split.queries) == len(split.qrels) == 700
    assert all(q.text.strip() and q.candidates is None for q in split.queries.values())
    full = load_split(root, "dev", query_field="metadata.question", max_queries=3)
    assert all(len(full.queries[q].text) > len(split.queries[q].text) for q in full.queries)
