"""Query-time latency of each encoder by input length (batch 1), and the LLM-as-query-encoder ratio.

Every encoder gets inputs of exactly the same token counts, cut from the same source questions with
its own tokenizer. The symmetric-LLM baseline is an LLM document encoder run as a query encoder (a
decoder-only model with its document prompt, or an LLM embedder with its own query prompt): CARE's
claim is that the small query encoder gives the LLM's document space without the LLM's latency at
query time, so the ratio of their medians is the figure to read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel

from bench.inputs import CountingEncoder, exact_inputs
from bench.stats import LatencySummary, summarize

Clock = Callable[[], float]
Side = Literal["query", "llm-as-query"]


class LengthLatency(BaseModel):
    tokens: int
    latency: LatencySummary
    samples_ms: list[float]


class EncoderLatency(BaseModel):
    name: str
    side: Side
    format: str
    quantization: str | None
    architecture: str
    lengths: list[LengthLatency]

    def median_at(self, tokens: int) -> float | None:
        for length in self.lengths:
            if length.tokens == tokens:
                return length.latency.p50_ms
        return None


class LatencyRatio(BaseModel):
    llm: str
    query_encoder: str
    tokens: int
    median_ratio: float  # LLM median / query-encoder median


class QueryEncoderBench(BaseModel):
    repeats: int
    warmup: int
    inputs_per_length: int
    threads: int
    encoders: list[EncoderLatency]
    ratios: list[LatencyRatio]


def time_encoder(
    encoder: CountingEncoder,
    side: Side,
    lengths: Sequence[int],
    sources: Sequence[str],
    repeats: int,
    warmup: int,
    clock: Clock = time.perf_counter,
) -> EncoderLatency:
    """Per length: ``warmup`` untimed encodes, then ``repeats`` timed single-text encodes cycling
    through one exact-length input per source."""
    results = []
    for tokens in lengths:
        inputs = exact_inputs(sources, tokens, encoder.count_tokens)
        for i in range(warmup):
            encoder.encode([inputs[i % len(inputs)]], batch_size=1)
        samples = []
        for i in range(repeats):
            text = inputs[i % len(inputs)]
            start = clock()
            encoder.encode([text], batch_size=1)
            samples.append((clock() - start) * 1000)
        results.append(
            LengthLatency(
                tokens=tokens, latency=summarize(samples), samples_ms=[round(s, 4) for s in samples]
            )
        )
    m = encoder.manifest
    return EncoderLatency(
        name=m.name,
        side=side,
        format=m.format,
        quantization=m.quantization,
        architecture=m.architecture,
        lengths=results,
    )


def latency_ratios(encoders: Sequence[EncoderLatency]) -> list[LatencyRatio]:
    """Every LLM-as-query encoder against every query encoder, at every length both were run at."""
    ratios = []
    for llm in (e for e in encoders if e.side == "llm-as-query"):
        for query in (e for e in encoders if e.side == "query"):
            for length in llm.lengths:
                base = query.median_at(length.tokens)
                if base:
                    ratios.append(
                        LatencyRatio(
                            llm=llm.name,
                            query_encoder=query.name,
                            tokens=length.tokens,
                            median_ratio=length.latency.p50_ms / base,
                        )
                    )
    return ratios
