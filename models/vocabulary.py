"""Which rows of an LLM's word-embedding table a query encoder keeps (models.embedding_table.trim_vocabulary).

EmbeddingGemma's 262,144-row table is 201 MB even at int8, most of a served query tower's memory, yet
a Chinese medical query touches a few thousand rows. The kept set is every token the tokenizer emits on
the texts the tower was trained on (text set, training queries, corpus), plus every single-character
token, every token holding a CJK character, the 256 byte-fallback tokens, the special tokens and the
ASCII tokens among the first
``ascii_below`` ids (a BPE vocabulary lists its most frequent merges first: common English words and
drug names), so an unseen word still falls back to its characters' or bytes' rows; anything else
reads the unknown token's row. The list travels in the int8 plan (models/int8_plan.py), and the int8
build trims the tokenizer to it as well (``trim_tokenizer``), which keeps its ids.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from tokenizers import Tokenizer


class KeptTokens(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    vocabulary_sha256: str  # of the token -> id map: the same however the tokenizer file is serialized
    unknown_id: int
    ids: list[int]


def vocabulary_digest(tokenizer_file: Path, tokenizer: Tokenizer | None = None) -> str:
    """Of ``tokenizer_file``'s token -> id map (``tokenizer``: that file, already loaded)."""
    loaded = tokenizer or Tokenizer.from_file(str(tokenizer_file))
    vocab = loaded.get_vocab(with_added_tokens=True)
    return hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()


def unknown_id(tokenizer_file: Path, tokenizer: Tokenizer | None = None) -> int:
    model = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("model", {})
    token = model.get("unk_token")
    loaded = tokenizer or Tokenizer.from_file(str(tokenizer_file))
    found = loaded.token_to_id(token) if token else None
    if found is None:
        raise ValueError(f"{tokenizer_file}: no unknown token to map dropped rows to")
    return int(found)


# Measured on the parity texts: without them an English query maps most words to the unknown row
# (cosine 0.71 to the untrimmed graph); the first 100k ids hold 66,091 ASCII tokens (drug names too).
ASCII_BELOW = 100_000
# Every token holding a CJK character or CJK punctuation (20,919 in EmbeddingGemma's vocabulary): a
# Chinese query never falls back to the unknown row, whatever the training texts held.
_CJK = re.compile("[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")


def tokens_to_keep(
    tokenizer_file: Path, texts: Iterable[str], table_rows: int, ascii_below: int = ASCII_BELOW
) -> KeptTokens:
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    keep: set[int] = set(tokenizer.get_added_tokens_decoder())
    for token, i in tokenizer.get_vocab().items():
        ascii_word = i < ascii_below and token.replace("\u2581", "").isascii()
        if len(token) == 1 or token.startswith("<0x") or ascii_word or _CJK.search(token):
            keep.add(i)
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == 4096:
            keep.update(i for encoding in tokenizer.encode_batch(batch) for i in encoding.ids)
            batch = []
    keep.update(i for encoding in tokenizer.encode_batch(batch) for i in encoding.ids)
    unknown = unknown_id(tokenizer_file, tokenizer)
    return KeptTokens(
        vocabulary_sha256=vocabulary_digest(tokenizer_file, tokenizer),
        unknown_id=unknown,
        ids=sorted(i for i in keep | {unknown} if i < table_rows),
    )


def trim_tokenizer(source: Path, target: Path, keep: Iterable[int]) -> int:
    """Write ``source``'s tokenizer to ``target`` holding only the tokens ``keep`` and, for BPE, the
    tokens and merges that build them; ids are unchanged. Returns the vocabulary size written.

    The service holds the tokenizer in memory beside the graph: EmbeddingGemma's 262,144 tokens and
    514,906 merges cost about 290 MiB resident, more than the trimmed int8 graph. A BPE merge whose
    result is not (part of) a kept token never fires on a text whose tokens are all kept, so dropping
    it leaves such texts' ids identical; other texts split into smaller kept pieces instead of tokens
    whose rows were dropped (which read the unknown row anyway). A word-level vocabulary drops its
    other tokens to the unknown token, which reads the same row.
    """
    spec = json.loads(source.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    kind = model.get("type")
    vocab: dict[str, int] = model.get("vocab", {})
    wanted = set(keep)
    kept = {token for token, i in vocab.items() if i in wanted}
    if kind == "BPE":
        pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        makers: dict[str, list[tuple[str, str]]] = {}
        for left, right in pairs:
            makers.setdefault(left + right, []).append((left, right))
        pending = list(kept)
        while pending:  # the parts every kept token is merged from, down to single symbols
            for pair in makers.get(pending.pop(), ()):
                for part in pair:
                    if part not in kept and part in vocab:
                        kept.add(part)
                        pending.append(part)
        model["merges"] = [list(p) for p in pairs if p[0] + p[1] in kept and p[0] in kept and p[1] in kept]
    elif kind != "WordLevel":
        raise ValueError(f"{source}: cannot trim a {kind} tokenizer (BPE and WordLevel only)")
    unknown = model.get("unk_token")
    model["vocab"] = {token: i for token, i in vocab.items() if token in kept or token == unknown}
    target.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return len(model["vocab"])
