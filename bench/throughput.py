"""Indexer throughput of document encoders, and how close it comes to the machine's matmul peak.

Estimated FLOP rate = tokens/s x FLOPs per token, with

    FLOPs per token = 2 * P + 4 * L * S * d_attn

P: parameters that multiply (all but embedding tables, which are lookups), one multiply-add (2
FLOPs) per token each; L layers attending over S positions with d_attn = heads x head_dim: QK^T and
the attention-weighted sum of V cost S * d_attn multiply-adds each per token. S is the input length
(every input here is exactly S tokens, so there is no padding); no causal discount is taken, since
SDPA with a padding mask computes the full S x S scores, and Gemma's sliding window (512) is wider
than the lengths measured. The peak is the best rate of repeated float32 n x n matmuls (2 n^3 FLOPs);
``matmul_peak`` also measures bf16 and int8 peaks for bench/precision.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from bench.inputs import exact_inputs

if TYPE_CHECKING:
    from models.hf_encoder import HFEncoder

Clock = Callable[[], float]

FORMULA = "FLOPs/token = 2·P + 4·L·S·d_attn (P: non-embedding parameters, S: tokens, d_attn = heads·head_dim)"


class PeakProbe(BaseModel):
    backend: str
    kind: str = "fp32"
    device: str
    size: int
    threads: int
    iterations: int
    seconds: float
    peak_gflops: float


class AttentionShape(BaseModel):
    layers: int
    width: int  # heads x head_dim


class IndexerRow(BaseModel):
    encoder: str
    device: str
    tokens: int
    documents: int
    batch_size: int
    seconds: float
    documents_per_s: float
    tokens_per_s: float
    matmul_params: int
    flops_per_token: float
    estimated_gflops: float
    fraction_of_peak: float | None


class IndexerBench(BaseModel):
    formula: str
    peak: PeakProbe
    rows: list[IndexerRow]


def flops_per_token(matmul_params: int, layers: int, context: int, attention_width: int) -> float:
    """2·P + 4·L·S·d_attn (see the module docstring)."""
    return 2.0 * matmul_params + 4.0 * layers * context * attention_width


def matmul_params(model: Any) -> int:
    """Parameters of ``model`` outside embedding tables (shared tensors counted once)."""
    import torch

    embedding = {
        id(p)
        for module in model.modules()
        if isinstance(module, torch.nn.Embedding)
        for p in module.parameters()
    }
    return sum(p.numel() for p in model.parameters() if id(p) not in embedding)


def attention_shape(config: Any) -> AttentionShape:
    text = config.get_text_config()
    heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return AttentionShape(layers=int(text.num_hidden_layers), width=heads * int(head_dim))


def _product(kind: str, size: int, device: str) -> Callable[[], object]:
    """One ``size x size`` by ``size x size`` product in ``kind`` arithmetic, as a callable."""
    import torch

    target = torch.device(device)
    if kind == "int8":
        if target.type != "cpu":
            raise ValueError("the int8 probe is a CPU dynamic-quantized linear")
        from models.precision import to_int8

        linear = to_int8(torch.nn.Sequential(torch.nn.Linear(size, size, bias=False))).eval()
        x = torch.randn(size, size)

        def int8() -> object:
            with torch.inference_mode():
                return linear(x)

        return int8
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    a = torch.randn(size, size, dtype=dtype, device=target)
    b = torch.randn(size, size, dtype=dtype, device=target)
    return lambda: torch.mm(a, b)


def matmul_peak(
    seconds: float = 3.0, size: int = 2048, device: str = "cpu", kind: str = "fp32", budget_s: float = 2.0
) -> PeakProbe:
    """Best ``size x size`` matmul rate in ``kind`` arithmetic (fp32, bf16, or int8: a dynamic int8
    linear, activation quantization included) over ``seconds``, at least three products.

    Where one product would take longer than ``budget_s`` (bf16 on a CPU without native bf16 runs
    hundreds of times slower than float32), the size shrinks so that it does not.
    """
    import torch

    cuda = torch.device(device).type == "cuda"

    def timed(product: Callable[[], object]) -> float:
        start = time.perf_counter()
        product()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    # The rate at 512 understates large products (no shrinking of fp32 or int8 at 2048 on 2 cores).
    small = min(size, 512)
    probe = _product(kind, small, device)
    timed(probe)
    rate = 2.0 * small**3 / max(timed(probe), 1e-9)
    fits = int((budget_s * rate / 2.0) ** (1 / 3)) // 128 * 128
    size = max(min(small, 256), min(size, fits))
    product = _product(kind, size, device)
    timed(product)  # first call allocates and picks kernels
    best, iterations = float("inf"), 0
    end = time.perf_counter() + seconds
    while iterations < 3 or time.perf_counter() < end:
        best = min(best, timed(product))
        iterations += 1
    return PeakProbe(
        backend=f"torch {torch.__version__}",
        kind=kind,
        device=device,
        size=size,
        threads=torch.get_num_threads(),
        iterations=iterations,
        seconds=seconds,
        peak_gflops=2.0 * size**3 / best / 1e9,
    )


def time_indexing(
    encoder: HFEncoder,
    lengths: Sequence[int],
    sources: Sequence[str],
    batch_size: int,
    peak_gflops: float | None,
    clock: Clock = time.perf_counter,
) -> list[IndexerRow]:
    """Per length: one exact-length document per source, one untimed batch, then all documents
    encoded as the indexer does (``encode`` in batches of ``batch_size``)."""
    params = matmul_params(encoder.model)
    shape = attention_shape(encoder.model.config)
    rows = []
    for tokens in lengths:
        docs = exact_inputs(sources, tokens, encoder.count_tokens)
        encoder.encode(docs[:batch_size], batch_size=batch_size)
        start = clock()
        encoder.encode(docs, batch_size=batch_size)
        seconds = clock() - start
        tokens_per_s = len(docs) * tokens / seconds
        per_token = flops_per_token(params, shape.layers, tokens, shape.width)
        estimated = tokens_per_s * per_token / 1e9
        rows.append(
            IndexerRow(
                encoder=encoder.manifest.name,
                device=str(encoder.device),
                tokens=tokens,
                documents=len(docs),
                batch_size=batch_size,
                seconds=seconds,
                documents_per_s=len(docs) / seconds,
                tokens_per_s=tokens_per_s,
                matmul_params=params,
                flops_per_token=per_token,
                estimated_gflops=estimated,
                fraction_of_peak=estimated / peak_gflops if peak_gflops else None,
            )
        )
    return rows
