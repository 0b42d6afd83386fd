"""Benchmark arithmetic: percentiles on known samples and the FLOP-rate formula."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.stats import percentile, summarize
from bench.throughput import attention_shape, flops_per_token, matmul_params


def test_percentiles_interpolate_between_closest_ranks() -> None:
    samples = [float(x) for x in range(1, 101)]  # 1..100
    assert percentile(samples, 50) == pytest.approx(50.5)
    assert percentile(samples, 95) == pytest.approx(95.05)
    assert percentile(samples, 99) == pytest.approx(99.01)
    assert percentile(samples, 0) == 1.0
    assert percentile(samples, 100) == 100.0
    assert percentile([7.0], 99) == 7.0


def test_percentiles_ignore_input_order_and_match_numpy() -> None:
    rng = np.random.default_rng(3)
    samples = rng.lognormal(size=257).tolist()
    for q in (1, 25, 50, 90, 95, 99, 99.9):
        assert percentile(samples, q) == pytest.approx(float(np.percentile(samples, q)))
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_percentile_refuses_empty_samples_and_bad_q() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary() -> None:
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert (s.count, s.min_ms, s.max_ms, s.mean_ms) == (4, 1.0, 4.0, 2.5)
    assert s.p50_ms == pytest.approx(2.5)
    assert s.p99_ms == pytest.approx(3.97)


def test_flops_per_token_is_two_per_parameter_plus_attention() -> None:
    # 2·P + 4·L·S·d_attn
    assert flops_per_token(1000, layers=2, context=8, attention_width=4) == 2000 + 4 * 2 * 8 * 4
    assert flops_per_token(10**6, layers=0, context=512, attention_width=64) == 2 * 10**6
    # e5-small shape (21.3M matmul parameters, 12 layers, d_attn 384) at 256 tokens: ~47.3 MFLOP/token.
    assert flops_per_token(21_300_000, 12, 256, 384) == pytest.approx(47.3e6, rel=1e-3)


def test_matmul_params_leave_out_embedding_tables(tiny_bert: Path) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert)
    h, i, layers = 32, 64, 2
    per_layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h  # attention, LNs, FFN
    embeddings_norm, pooler = 2 * h, h * h + h
    assert matmul_params(model) == layers * per_layer + embeddings_norm + pooler
    total = sum(p.numel() for p in model.parameters())
    tables = model.embeddings
    lookups = sum(
        m.weight.numel()
        for m in (tables.word_embeddings, tables.position_embeddings, tables.token_type_embeddings)
    )
    assert matmul_params(model) == total - lookups
    shape = attention_shape(model.config)
    assert (shape.layers, shape.width) == (2, 32)


def test_attention_shape_uses_head_dim_when_set() -> None:
    from transformers import BertConfig, Gemma3TextConfig

    # Gemma-3-270M's shape: 4 heads of 256 on a hidden size of 640.
    gemma = Gemma3TextConfig(hidden_size=640, num_attention_heads=4, head_dim=256, num_hidden_layers=18)
    assert attention_shape(gemma).model_dump() == {"layers": 18, "width": 1024}
    bert = BertConfig(hidden_size=384, num_attention_heads=12, num_hidden_layers=12)
    assert attention_shape(bert).model_dump() == {"layers": 12, "width": 384}
