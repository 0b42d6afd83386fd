"""Inputs of an exact token length, measured with the encoder's own tokenizer.

The count is what the model sees: prompt, special tokens and (for last-token pooling) the appended EOS
included, exactly as the encoder's ``count_tokens`` reports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from models.manifest import ModelManifest

TokenCounter = Callable[[Sequence[str]], list[int]]

# Subword merges make the count of a prefix non-monotone by a token or two near any cut point.
SCAN_WINDOW = 8


class InputLengthError(ValueError):
    """No prefix of the source text has the requested token count."""


@runtime_checkable
class CountingEncoder(Protocol):
    """An ``Encoder`` that also reports token counts (OnnxEncoder and HFEncoder both do)."""

    manifest: ModelManifest

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...


def cut_to_tokens(text: str, tokens: int, count_tokens: TokenCounter) -> str:
    """The shortest non-empty prefix of ``text`` that counts as exactly ``tokens`` tokens."""
    overhead, whole = count_tokens(["", text])
    if overhead >= tokens:
        raise InputLengthError(
            f"{tokens} tokens leave no room for text: the prompt and special tokens alone are {overhead}"
        )
    if whole < tokens:
        raise InputLengthError(f"source text is shorter than {tokens} tokens")
    lo, hi = 1, len(text)  # invariant: text[:hi] has at least `tokens` tokens
    while lo < hi:
        mid = (lo + hi) // 2
        if count_tokens([text[:mid]])[0] >= tokens:
            hi = mid
        else:
            lo = mid + 1
    ends = range(max(1, hi - SCAN_WINDOW), min(len(text), hi + SCAN_WINDOW) + 1)
    candidates = [text[:end] for end in ends]
    for candidate, count in zip(candidates, count_tokens(candidates), strict=True):
        if count == tokens:
            return candidate
    raise InputLengthError(f"no prefix of the source text is exactly {tokens} tokens")


def exact_inputs(sources: Sequence[str], tokens: int, count_tokens: TokenCounter) -> list[str]:
    """One input of exactly ``tokens`` tokens cut from each source."""
    return [cut_to_tokens(source, tokens, count_tokens) for source in sources]
