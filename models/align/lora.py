"""A minimal LoRA linear layer: W x + (alpha / r) * B A x, with W frozen.

Hand-written rather than ``peft`` (not installed, and the serving product never needs it): the only
consumers are the document side, which wraps a few named projections, and the delta file, which
stores A and B and merges them into W when the document encoder is rebuilt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

# Attention and MLP projections of Gemma3, Qwen3, Llama and Mistral decoder layers.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


class LoRALinear(nn.Module):
    """``base`` (frozen) plus a trainable rank-``rank`` update; starts as exactly ``base`` (B = 0)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError("LoRA rank must be positive")
        self.base = base
        for param in base.parameters():
            param.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        # Kaiming-uniform A as in the LoRA paper's reference code; B = 0 keeps the start point.
        bound = 1.0 / math.sqrt(base.in_features)
        with torch.no_grad():
            self.lora_a.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale


def merge_lora(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``weight`` + scale * B A, computed in float32 whatever the stored dtypes."""
    return weight + scale * (lora_b.float() @ lora_a.float()).to(weight.dtype)


def wrap_linears(
    layers: Sequence[nn.Module], targets: Sequence[str], rank: int, alpha: float, seed: int
) -> list[LoRALinear]:
    """Replace every ``nn.Linear`` named in ``targets`` inside ``layers`` by a LoRALinear, in module order.

    A seeded generator of its own makes the initialization reproducible without touching the global
    RNG (which the training loop's dropout draws from).
    """
    generator = torch.Generator().manual_seed(seed)
    wrapped = []
    for layer in layers:
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if child_name in targets and isinstance(child, nn.Linear):
                    lora = LoRALinear(child, rank, alpha, generator)
                    setattr(parent, child_name, lora)
                    wrapped.append(lora)
    if not wrapped:
        raise ValueError(f"no nn.Linear named any of {list(targets)} in the selected layers")
    return wrapped
