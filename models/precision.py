"""Numeric precision of the transformers runtime: which fast path to try, and how to build it.

``fp32`` is the reference and the default. A fast path is a copy of the float32 model in a cheaper
arithmetic; it is only used after ``models.precision_gate`` has shown that it reproduces the float32
vectors (see ``HFEncoder``):

- ``bf16``: the transformer's weights and activations in bfloat16. Fast where the hardware multiplies
  bf16 natively (CUDA; CPUs with AVX-512 BF16 or AMX through oneDNN). On a CPU without them torch falls
  back to a scalar kernel: measured 0.28 GFLOP/s against 155 for float32 on a 2-core AVX2 EPYC.
- ``int8``: dynamic int8 of the transformer's ``nn.Linear`` layers (weights per output channel,
  activations per tensor at run time; fbgemm/x86 kernels, AVX2 and up). CPU only.

``auto`` picks bf16 on CUDA and on CPUs with native bf16, int8 on other CPUs; the gate still decides.
The Dense head of a sentence-transformers embedder always stays float32: it runs once per document.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from models.encoder import Precision

FastPrecision = Literal["bf16", "int8"]

# Copies the float32 model into a fast path (the argument is left untouched).
FastPathBuilder = Callable[[nn.Module], nn.Module]


class PrecisionError(ValueError):
    """A precision the device cannot run (int8 on CUDA)."""


def native_cpu_bf16() -> bool:
    """Whether oneDNN multiplies bf16 natively on this CPU (AVX-512 BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def fast_path_for(requested: Precision, device: torch.device, cpu_bf16: bool) -> FastPrecision | None:
    """The fast path to try for ``requested`` on ``device`` (None: float32, nothing to try)."""
    if requested == "fp32":
        return None
    if device.type == "cuda":
        if requested == "int8":
            raise PrecisionError("int8 is a CPU path (dynamic quantization); use bf16 or auto on CUDA")
        return "bf16"
    if requested == "auto":
        return "bf16" if cpu_bf16 else "int8"
    return requested


def to_bf16(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(torch.bfloat16)


def to_int8(model: nn.Module) -> nn.Module:
    """Every ``nn.Linear`` of the model as a dynamic int8 linear, weights quantized per output channel."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return quantize_dynamic(copy.deepcopy(model), {name: per_channel_dynamic_qconfig for name in names})


# Registry of fast paths; tests swap an entry to inject a bad one.
FAST_PATHS: dict[FastPrecision, FastPathBuilder] = {"bf16": to_bf16, "int8": to_int8}
