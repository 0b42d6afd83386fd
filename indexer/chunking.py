"""Token-aware splitting of long documents into overlapping chunks the encoder reads whole.

A document longer than the encoder's budget is cut into windows of at most ``max_tokens`` tokens,
consecutive windows sharing ``overlap`` tokens so a passage cut in two is still read whole by one of
them. Tokens are the encoder's own (their character spans in the raw text, from
``Chunkable.token_spans``), so a chunk's size is measured as the encoder will count it, not guessed
from characters.

Where a window ends: at the last sentence end (Chinese 。！？, Latin .!? followed by a space, a line
break) in the second half of the window when there is one; else at the last word boundary (a space,
or beside a CJK character, which is a token of its own); else at the window's last token.

The split depends only on the text, the spans and the two numbers, so a rerun yields the same chunks
(resumed and incremental indexing rely on it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Span = tuple[int, int]
TokenSpans = Callable[[str], Sequence[Span]]

CJK_SENTENCE_ENDS = frozenset("。！？")
LATIN_SENTENCE_ENDS = frozenset(".!?")
# Boundary quality: the best available one near the window's end is where the window is cut.
_SENTENCE, _WORD, _TOKEN = 2, 1, 0


@dataclass(frozen=True)
class Chunk:
    """One window of a document: ``text == document[start:end]``."""

    index: int
    text: str
    start: int
    end: int


def _is_cjk(ch: str) -> bool:
    # CJK punctuation, kana, ideographs, Hangul and full-width forms: each a word (and token) of its own.
    return ch >= "\u3000"


def _boundary(text: str, spans: Sequence[Span], cut: int) -> int:
    """How good a cut between token ``cut - 1`` and token ``cut`` is."""
    end = spans[cut - 1][1]
    before = text[end - 1] if end > 0 else ""
    # The gap between the two tokens plus the next token's first character.
    after = text[end : spans[cut][0] + 1]
    if before in CJK_SENTENCE_ENDS or before == "\n" or "\n" in after:
        return _SENTENCE
    space_after = after[:1].isspace()
    if before in LATIN_SENTENCE_ENDS and space_after:
        return _SENTENCE
    if space_after or before.isspace() or _is_cjk(before) or _is_cjk(after[-1:]):
        return _WORD
    return _TOKEN


def _window_end(text: str, spans: Sequence[Span], start: int, max_tokens: int, overlap: int) -> int:
    """Token index where the window starting at token ``start`` ends (exclusive)."""
    last = start + max_tokens
    # Cut no earlier than half the window (and always past the overlap, so the next window advances).
    first = min(last, start + max(overlap + 1, max_tokens // 2))
    best, best_quality = last, -1
    for cut in range(last, first - 1, -1):
        quality = _boundary(text, spans, cut)
        if quality > best_quality:
            best, best_quality = cut, quality
            if quality == _SENTENCE:
                break
    return best


def split_text(text: str, token_spans: TokenSpans, max_tokens: int, overlap: int) -> list[Chunk]:
    """Chunks of ``text`` of at most ``max_tokens`` tokens each, consecutive ones sharing ``overlap``
    tokens, covering every token of the text in order. A text within the budget is one chunk equal
    to it.

    Chunk 0 starts at the text's start and the last one ends at its end; others start at their first
    token and end at their last, so only the whitespace between two chunks (with no overlap) is in
    neither.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if not 0 <= overlap < max_tokens:
        raise ValueError(f"overlap must be in [0, max_tokens), got {overlap} with max_tokens {max_tokens}")
    spans = list(token_spans(text))
    if len(spans) <= max_tokens:
        return [Chunk(index=0, text=text, start=0, end=len(text))]
    chunks: list[Chunk] = []
    start = 0
    while True:
        done = len(spans) - start <= max_tokens
        stop = len(spans) if done else _window_end(text, spans, start, max_tokens, overlap)
        first_char = 0 if start == 0 else spans[start][0]
        last_char = len(text) if done else spans[stop - 1][1]
        chunks.append(Chunk(len(chunks), text[first_char:last_char], first_char, last_char))
        if done:
            return chunks
        start = stop - overlap
