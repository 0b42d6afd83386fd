"""`medsearch eval` end to end with tiny random-weight models on a tiny Chinese BEIR dataset: every
configuration in one run, the JSON shape, the document-vector cache, and black-box mode against the
real app under uvicorn."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from evaluation.blackbox import ServiceError, fetch_pair
from indexer.pipeline import index_files
from medsearch.cli import main
from models.encoder import EncodeMode, Encoder
from models.loading import load_encoder
from models.manifest import read_manifest
from service.app import create_app
from service.state import ServingState
from settings import Settings
from store.factory import open_store
from tests.conftest import SHARED_DATA
from tests.servers import free_port, uvicorn_thread

DATA = Path(__file__).with_name("data")
BERT_PAIR = "symmetric-bert:tiny-bert-onnx/tiny-bert"
LLM = "symmetric-llm:tiny-gemma"
RETRIEVAL_KEYS = {"ndcg@10", "recall@10", "recall@100", "mrr@10", "map@10", "queries"}

CORPUS = [
    ("d1", "高血压", "高血压患者可以吃党参吗？党参有降血压的作用。"),
    ("d2", "", "糖尿病患者饮食要注意少吃糖，多吃蔬菜。"),
    ("d3", "", "感冒发烧咳嗽可以多喝水，注意休息。"),
    ("d4", "孕妇用药", "孕妇不建议自行服用布洛芬，应咨询医生。"),
    ("d5", "", "头痛失眠可能和焦虑有关。"),
    ("d6", "", "胃痛腹泻恶心呕吐要注意卫生。"),
    ("d7", "Aspirin", "Aspirin is used for pain and fever."),
    ("d8", "", "糖尿病患者需要定期检查血糖指标。"),
]
QUERIES: list[dict[str, Any]] = [
    {"_id": "q1", "text": "高血压能吃党参吗"},
    {"_id": "q2", "text": "糖尿病饮食注意什么"},
    {"_id": "q3", "text": "孕妇能吃布洛芬吗", "candidates": ["d4", "d1", "d5"]},
    {"_id": "q4", "text": "aspirin fever"},
    {"_id": "q5", "text": "头痛失眠"},  # train split only
    {"_id": "q6", "text": "胃痛怎么办"},  # no qrels at all
]
DEV_QRELS = [("q1", "d1"), ("q2", "d2"), ("q2", "d8"), ("q3", "d4"), ("q4", "d7")]


def write_dataset(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text(
        "".join(
            json.dumps({"_id": d, "title": title, "text": text, "metadata": {"n": i}}, ensure_ascii=False)
            + "\n"
            for i, (d, title, text) in enumerate(CORPUS)
        ),
        encoding="utf-8",
    )
    (root / "queries.jsonl").write_text(
        "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUERIES), encoding="utf-8"
    )
    dev = "".join(f"{q}\t{d}\t1\n" for q, d in DEV_QRELS)
    (root / "qrels" / "dev.tsv").write_text(f"query-id\tcorpus-id\tscore\n{dev}", encoding="utf-8")
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq5\td5\t1\n", encoding="utf-8")
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "dataset")


@pytest.fixture
def models(tmp_path: Path, tiny_bert: Path, tiny_onnx: Path, tiny_gemma: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    for path in (tiny_bert, tiny_onnx, tiny_gemma):
        (root / path.name).symlink_to(path)
    return root


@pytest.fixture
def settings(tmp_path: Path, models: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in [k for k in os.environ if k.startswith("MEDSEARCH_")]:
        monkeypatch.delenv(key)
    env = {
        "MEDSEARCH_HOME": str(tmp_path / "home"),
        "MEDSEARCH_MODELS_DIR": str(models),
        "MEDSEARCH_QUERY_MODEL": "tiny-bert-onnx",
        "MEDSEARCH_DOCUMENT_MODEL": "tiny-bert",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


class Recording:
    """Wraps a real encoder; logs (model directory name, texts) for every encode call; an encoder
    opened in query mode logs as ``NAME[query]``."""

    def __init__(self, inner: Encoder, name: str, log: list[tuple[str, list[str]]]) -> None:
        self.manifest = inner.manifest
        self._inner = inner
        self._name = name
        self._log = log

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        self._log.append((self._name, list(texts)))
        return self._inner.encode(texts, batch_size)


@pytest.fixture
def encode_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    log: list[tuple[str, list[str]]] = []

    def recording_loader(
        path: Path,
        threads: int = 0,
        device: Any = "auto",
        mode: EncodeMode = "document",
        precision: Any = "fp32",
    ) -> Encoder:
        name = path.name if mode == "document" else f"{path.name}[query]"
        return Recording(load_encoder(path, threads, device, mode, precision=precision), name, log)

    # The CLI imports load_encoder when it runs, so the patched one is what it uses.
    monkeypatch.setattr("models.loading.load_encoder", recording_loader)
    return log


def run_eval(args: list[str], out: Path) -> dict[str, Any]:
    assert main(["eval", *args, "--output", str(out)]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_run_compares_every_configuration(
    dataset: Path,
    settings: Settings,
    tmp_path: Path,
    tiny_onnx: Path,
    tiny_bert: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = run_eval(
        [str(dataset), "--split", "dev", "--sts", str(DATA / "sts-plain.jsonl")], tmp_path / "r.json"
    )
    configs = [BERT_PAIR, LLM, "bm25", "hybrid-rrf"]
    assert set(result) == {*configs, "default", "dataset", "run", "machine"}
    assert result["default"] == result[BERT_PAIR]

    for name in (BERT_PAIR, LLM):
        entry = result[name]
        assert set(entry) >= RETRIEVAL_KEYS
        assert entry["queries"] == 4  # q5 is train-only, q6 has no qrels
        assert all(0.0 <= entry[k] <= 100.0 for k in RETRIEVAL_KEYS - {"queries"})
        assert set(entry["reranking"]) == {"map@10", "mrr@10", "queries"}
        assert entry["sts"]["sts-plain"]["pairs"] == 4
        assert -100.0 <= entry["sts"]["sts-plain"]["spearman"] <= 100.0
    bert = result[BERT_PAIR]
    assert bert["kind"] == "symmetric-bert"
    assert bert["query_fingerprint"] == read_manifest(tiny_onnx).fingerprint
    assert bert["document_fingerprint"] == read_manifest(tiny_bert).fingerprint
    assert result[LLM]["query_encoder"] == result[LLM]["document_encoder"] == "tiny-gemma"

    # Every relevant document shares its query's rarest words: BM25 ranks it first.
    assert result["bm25"]["mrr@10"] == pytest.approx(100.0)
    assert result["bm25"]["method"]["library"].startswith("bm25s==")
    assert "reranking" not in result["bm25"]
    assert result["hybrid-rrf"]["method"]["fuses"] == ["bm25", BERT_PAIR]

    ds = result["dataset"]
    assert ds["split"] == "dev" and ds["documents"] == 8 and ds["queries"] == 4
    assert ds["corpus_sha256"] == sha256(dataset / "corpus.jsonl")
    assert ds["qrels_sha256"] == sha256(dataset / "qrels" / "dev.tsv")
    combined = "".join(
        f"{name}\0{ds[f'{name}_sha256']}\n" for name in ("corpus", "queries", "qrels")
    ).encode()
    assert ds["fingerprint"] == hashlib.sha256(combined).hexdigest()
    assert {"platform", "cpu_count", "python"} <= set(result["machine"])
    assert result["run"]["reranking"]["candidates"] == "dataset+bm25-mined"

    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("| configuration | kind | nDCG@10 |")
    assert f"| {BERT_PAIR} (default) | symmetric-bert |" in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(configs)


def test_second_run_reads_document_vectors_from_the_cache(
    dataset: Path, settings: Settings, tmp_path: Path, encode_log: list[tuple[str, list[str]]]
) -> None:
    corpus_texts = {f"{t}\n{x}" if t else x for _, t, x in CORPUS}
    query_texts = {str(q["text"]) for q in QUERIES}
    args = [str(dataset), "--config", BERT_PAIR, "--config", LLM, "--task", "retrieval"]

    first = run_eval(args, tmp_path / "first.json")
    encoded = {
        name: {t for n, texts in encode_log if n == name for t in texts}
        for name in ("tiny-bert", "tiny-gemma")
    }
    assert encoded["tiny-bert"] == corpus_texts
    assert encoded["tiny-gemma"] == corpus_texts | (query_texts - {"头痛失眠", "胃痛怎么办"})
    assert len(list((settings.home / "cache" / "document-vectors").iterdir())) == 2

    encode_log.clear()
    second = run_eval([*args, "--max-queries", "2"], tmp_path / "second.json")
    assert all(name != "tiny-bert" for name, _ in encode_log)  # the document encoder never ran
    assert {t for name, texts in encode_log if name == "tiny-gemma" for t in texts} == {
        "高血压能吃党参吗",
        "糖尿病饮食注意什么",
    }  # the LLM only encoded queries, as its configuration requires
    assert second[BERT_PAIR]["queries"] == 2

    third = run_eval(args, tmp_path / "third.json")
    for name in (BERT_PAIR, LLM):
        assert {k: third[name][k] for k in RETRIEVAL_KEYS} == {k: first[name][k] for k in RETRIEVAL_KEYS}


def test_unknown_configuration_and_missing_split_fail_with_exit_2(
    dataset: Path, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(dataset), "--config", "nope"]) == 2
    assert "no configuration 'nope'" in capsys.readouterr().err
    assert main(["eval", str(dataset), "--split", "test"]) == 2
    assert main(["eval", str(dataset), "--list-configs"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{BERT_PAIR}  (default)", LLM, "bm25", "hybrid-rrf"]


def test_llm_embedder_encodes_queries_with_its_query_prompt(
    dataset: Path,
    settings: Settings,
    models: Path,
    tiny_embedder: Path,
    tmp_path: Path,
    encode_log: list[tuple[str, list[str]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    (models / tiny_embedder.name).symlink_to(tiny_embedder)
    assert main(["eval", str(dataset), "--list-configs"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{BERT_PAIR}  (default)",
        "symmetric-llm:tiny-embedder",
        LLM,
        "bm25",
        "hybrid-rrf",
    ]

    name = "symmetric-llm:tiny-embedder"
    args = [str(dataset), "--config", name, "--config", LLM, "--task", "retrieval", "--no-cache"]
    result = run_eval(args, tmp_path / "r.json")
    entry = result[name]
    assert entry["kind"] == "symmetric-llm" and entry["queries"] == 4
    assert entry["query_encoder"] == entry["document_encoder"] == "tiny-embedder"
    encoded = {n: [t for m, texts in encode_log if m == n for t in texts] for n, _ in encode_log}
    dev_queries = [str(q["text"]) for q in QUERIES[:4]]
    corpus_texts = {f"{t}\n{x}" if t else x for _, t, x in CORPUS}
    # Documents with the document prompt, queries (only) with the query prompt.
    assert set(encoded["tiny-embedder"]) == corpus_texts
    assert encoded["tiny-embedder[query]"] == dev_queries
    # The decoder-only LLM has no query prompt: one encoder, both sides, as before.
    assert "tiny-gemma[query]" not in encoded
    assert set(encoded["tiny-gemma"]) == corpus_texts | set(dev_queries)


# --- black-box ----------------------------------------------------------------------------------


@pytest.fixture
def serving_state(
    dataset: Path, settings: Settings, tiny_bert: Path, tiny_onnx: Path
) -> Iterator[ServingState]:
    """The real service state: the corpus indexed by the CLI's pipeline, the ONNX query encoder."""
    store = open_store(None, settings.store_path)
    summary = index_files(
        [dataset / "corpus.jsonl"], load_encoder(tiny_bert), store, settings.collection, sparse=True
    )
    assert summary.ok and summary.indexed == len(CORPUS)
    state = ServingState(settings=settings, encoder=load_encoder(tiny_onnx), store=store)
    yield state
    state.close()


@pytest.fixture
def service_url(settings: Settings, serving_state: ServingState) -> Iterator[str]:
    with uvicorn_thread(create_app(settings, serving_state)) as url:
        yield url


def test_black_box_matches_in_process(dataset: Path, service_url: str, tmp_path: Path) -> None:
    served = run_eval([str(dataset), "--url", service_url], tmp_path / "served.json")
    assert set(served) == {BERT_PAIR, "default", "dataset", "run", "machine"}
    assert served["run"]["mode"] == "service" and served["run"]["url"] == service_url
    local = run_eval([str(dataset), "--config", "default", "--task", "retrieval"], tmp_path / "local.json")
    for key in RETRIEVAL_KEYS:
        assert served[BERT_PAIR][key] == pytest.approx(local[BERT_PAIR][key], abs=1e-6), key
    assert served[BERT_PAIR]["document_fingerprint"] == local[BERT_PAIR]["document_fingerprint"]
    assert served["dataset"]["fingerprint"] == local["dataset"]["fingerprint"]
    hybrid = run_eval([str(dataset), "--url", service_url, "--mode", "hybrid"], tmp_path / "hybrid.json")
    assert hybrid["run"]["search_mode"] == "hybrid"
    fused = hybrid[f"hybrid-rrf:{BERT_PAIR}"]
    assert fused["kind"] == "hybrid-rrf"
    # The tiny corpus' queries share words with their documents: BM25 in the fusion can only help.
    assert fused["ndcg@10"] >= served[BERT_PAIR]["ndcg@10"]


def test_black_box_refuses_options_it_cannot_measure(
    dataset: Path, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["eval", str(dataset), "--url", url, "--task", "rerank"]) == 2
    assert "retrieval only" in capsys.readouterr().err
    assert main(["eval", str(dataset), "--url", url]) == 2  # nothing listens there
    assert url in capsys.readouterr().err


async def test_black_box_refuses_a_collection_holding_another_corpus(
    settings: Settings, serving_state: ServingState
) -> None:
    app = create_app(settings, serving_state)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://medsearch") as client,
    ):
        pair = await fetch_pair(client, corpus_size=len(CORPUS))
        assert pair.name == BERT_PAIR
        with pytest.raises(
            ServiceError, match=f"holds {len(CORPUS)} documents but the dataset's corpus has 9"
        ):
            await fetch_pair(client, corpus_size=9)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "cmedqa-im").is_dir(), reason="shared data not present")
def test_real_default_pair_on_a_cmedqa_subset(
    default_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared dev split and CARE's STS file work as they are, and the served pair is a real retriever."""
    src = SHARED_DATA / "cmedqa-im"
    rows = (src / "qrels" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:11]
    positives = {row.split("\t")[1] for row in rows}
    subset = tmp_path / "cmedqa-subset"
    (subset / "qrels").mkdir(parents=True)
    (subset / "qrels" / "dev.tsv").write_text("\n".join(["query-id\tcorpus-id\tscore", *rows]) + "\n")
    docs = [x for x in (src / "corpus.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    chosen = [x for x in docs if json.loads(x)["_id"] in positives] + docs[:20]
    (subset / "corpus.jsonl").write_text("\n".join(dict.fromkeys(chosen)) + "\n", encoding="utf-8")
    (subset / "queries.jsonl").write_text(
        (src / "queries.jsonl").read_text(encoding="utf-8"), encoding="utf-8"
    )
    for key in [k for k in os.environ if k.startswith("MEDSEARCH_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MEDSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDSEARCH_MODELS_DIR", str(default_models))
    sts = SHARED_DATA / "care-samples" / "stage2-medteb-sts.jsonl"
    args = [str(subset), "--config", "default", "--config", "bm25", "--sts", str(sts)]
    result = run_eval(args, tmp_path / "r.json")
    default = result["default"]
    assert default["kind"] == "asymmetric"
    assert default["query_encoder"] == "embeddinggemma-300m-k4-query-onnx-int8"
    assert default["queries"] == 10
    assert default["ndcg@10"] > 60  # random vectors would score about 15 on 30 documents
    assert default["sts"]["stage2-medteb-sts"]["spearman"] > 30
    assert result["bm25"]["ndcg@10"] > 20


def test_reference_baselines_of_the_same_files_and_split_are_reported_not_rerun(
    dataset: Path,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from evaluation import references

    first = run_eval([str(dataset), "--split", "dev", "--config", "bm25"], tmp_path / "a.json")
    assert "references" not in first  # the shipped references are for cmedqa-im, not these files
    row = {
        "configuration": "symmetric-bert:fine-tuned",
        "kind": "symmetric-bert",
        "dataset_fingerprint": first["dataset"]["fingerprint"],
        "split": "dev",
        "metrics": {"ndcg@10": 42.5},
        "how": "trained elsewhere",
        "measured": "2026-12-03",
    }
    other_split = {**row, "configuration": "symmetric-bert:other", "split": "test"}
    path = tmp_path / "references.json"
    path.write_text(json.dumps([row, other_split]), encoding="utf-8")
    monkeypatch.setattr(references, "REFERENCES_FILE", path)
    capsys.readouterr()

    result = run_eval([str(dataset), "--split", "dev", "--config", "bm25"], tmp_path / "b.json")
    assert result["references"] == {
        "symmetric-bert:fine-tuned": {
            "kind": "symmetric-bert",
            "ndcg@10": 42.5,
            "how": "trained elsewhere",
            "measured": "2026-12-03",
        }
    }
    table = capsys.readouterr().out
    assert "| symmetric-bert:fine-tuned (reference, not rerun) | symmetric-bert | 42.5 |" in table
    subset = run_eval(
        [str(dataset), "--split", "dev", "--config", "bm25", "--max-queries", "2"], tmp_path / "c.json"
    )
    assert "references" not in subset  # figures of all queries are not comparable with a subset


def test_the_shipped_reference_is_the_fine_tuned_e5_on_cmedqa_dev() -> None:
    from evaluation.references import load_references

    (reference,) = [r for r in load_references() if r.split == "dev"]
    assert reference.kind == "symmetric-bert" and reference.metrics["ndcg@10"] == 29.5
