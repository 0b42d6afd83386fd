"""Pooling and normalization in torch, shared by the transformers runtime and the ONNX export wrapper.

Kept in one place so the exported graph and the PyTorch encoder cannot drift apart.
"""

from __future__ import annotations

import torch

from models.manifest import Pooling


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Pool (batch, seq, hidden) states to (batch, hidden).

    ``last_token`` takes the last position whose mask is 1, which is the final column under left padding
    (as decoder-only encoders are fed) and still correct under right padding.
    """
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = (positions * mask.to(positions.dtype)).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def finish(vectors: torch.Tensor, dim: int, normalize: bool) -> torch.Tensor:
    """Keep the first ``dim`` dimensions (Matryoshka-style truncation), then L2-normalize."""
    vectors = vectors[:, :dim]
    if normalize:
        vectors = torch.nn.functional.normalize(vectors, p=2.0, dim=-1)
    return vectors
