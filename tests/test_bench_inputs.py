"""Benchmark inputs have exactly the requested token count, as each encoder's own tokenizer sees it."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from bench.inputs import CountingEncoder, InputLengthError, cut_to_tokens, exact_inputs
from bench.queries import QUESTIONS, question_sources
from bench.query_latency import time_encoder
from models.loading import load_encoder

LENGTHS = (8, 16, 32, 64)


def test_onnx_query_encoder_inputs_have_exact_lengths(tiny_onnx: Path) -> None:
    from models.onnx_encoder import OnnxEncoder

    encoder = load_encoder(tiny_onnx)
    assert isinstance(encoder, OnnxEncoder)
    assert encoder.manifest.prompt == "query: {text}"  # "query:" is 6 tokens, 8 with <s> and </s>
    with pytest.raises(InputLengthError, match="no room for text"):
        cut_to_tokens(question_sources(1)[0], 8, encoder.count_tokens)
    sources = question_sources(3)
    for tokens in LENGTHS[1:]:
        inputs = exact_inputs(sources, tokens, encoder.count_tokens)
        assert len(set(inputs)) == 3
        for text in inputs:
            # What the graph is fed: prompt and <s> ... </s> included, no padding.
            assert encoder.tokenize([text])["input_ids"].shape == (1, tokens)
            # The shortest such prefix: one character less is one token less (char-level tokenizer).
            assert encoder.count_tokens([text[:-1]]) == [tokens - 1]


def test_decoder_inputs_have_exact_lengths_with_eos(tiny_gemma: Path) -> None:
    from models.hf_encoder import HFEncoder

    encoder = load_encoder(tiny_gemma, device="cpu")
    assert isinstance(encoder, HFEncoder)
    for tokens in LENGTHS:
        (text,) = exact_inputs(question_sources(1), tokens, encoder.count_tokens)
        ids = encoder.tokenize([text])[0]
        assert len(ids) == tokens
        assert ids[-1] == encoder.eos_id  # the EOS the encoder appends is counted
        assert text in "".join(QUESTIONS)


class RecordingEncoder:
    """A ``CountingEncoder`` that keeps every ``encode`` call of the one it wraps."""

    def __init__(self, encoder: CountingEncoder) -> None:
        self.inner, self.manifest = encoder, encoder.manifest
        self.calls: list[tuple[list[str], int]] = []

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        self.calls.append((list(texts), batch_size))
        return self.inner.encode(texts, batch_size=batch_size)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.inner.count_tokens(texts)


@pytest.mark.parametrize("model", ["tiny_onnx", "tiny_gemma"])
def test_the_latency_bench_encodes_one_exact_input_per_source_at_each_length(
    model: str, request: pytest.FixtureRequest
) -> None:
    encoder = load_encoder(Path(request.getfixturevalue(model)), device="cpu")
    assert isinstance(encoder, CountingEncoder)
    recording = RecordingEncoder(encoder)
    ticks = itertools.count(0.0, 0.5)  # every timed encode takes one tick: 500 ms
    result = time_encoder(recording, "query", (16, 32), question_sources(3), 4, 2, lambda: next(ticks))

    assert (result.name, result.format) == (encoder.manifest.name, encoder.manifest.format)
    assert [x.tokens for x in result.lengths] == [16, 32]
    assert all(x.samples_ms == [500.0] * 4 and x.latency.p50_ms == 500.0 for x in result.lengths)
    assert all(len(texts) == 1 and batch_size == 1 for texts, batch_size in recording.calls)
    for i, tokens in enumerate((16, 32)):
        texts = [texts[0] for texts, _ in recording.calls[6 * i : 6 * (i + 1)]]  # 2 warm-up, 4 timed
        assert encoder.count_tokens(texts) == [tokens] * 6
        first, second, third = texts[2:5]
        assert len({first, second, third}) == 3  # one input cut from each source, cycled through
        assert texts == [first, second, first, second, third, first]


def merging_counter(texts: Sequence[str]) -> list[int]:
    """A subword-like count: every character is a token, but "ab" merges into one."""
    return [len(t) - t.count("ab") for t in texts]


def test_cut_finds_exact_count_where_merges_make_counts_jump() -> None:
    text = "ab" * 20  # prefixes count 1, 1, 2, 2, 3, ...: each count is reached by two prefixes
    for tokens in (1, 5, 20):
        cut = cut_to_tokens(text, tokens, merging_counter)
        assert merging_counter([cut]) == [tokens]
        assert merging_counter([cut[:-1]]) == [tokens - 1] or cut == "a"


def test_cut_refuses_impossible_counts() -> None:
    with pytest.raises(InputLengthError, match="shorter than 99"):
        cut_to_tokens("abc", 99, merging_counter)
    with pytest.raises(InputLengthError, match="no room for text"):
        cut_to_tokens("abc", 2, lambda texts: [len(t) + 2 for t in texts])

    def even_only(texts: Sequence[str]) -> list[int]:
        return [2 * len(t) for t in texts]

    with pytest.raises(InputLengthError, match="exactly 7"):
        cut_to_tokens("x" * 20, 7, even_only)
