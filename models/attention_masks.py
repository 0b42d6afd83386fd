"""Attention masks for bidirectional encoders built on decoder code (EmbeddingGemma: Gemma 3 with
``use_bidirectional_attention``).

transformers builds such a model's masks with ``vmap`` over mask functions, which the ONNX tracer
cannot follow. The same masks are built here from plain tensor ops, additive and one per layer type,
and passed as the mapping the model accepts in place of its own: global layers see every real
token, sliding layers every real token closer than the window (transformers'
``_bidirectional_window_overlay``). Training and the exported graph use this one function, so they
see identical masks.
"""

from __future__ import annotations

from typing import Any

import torch


def is_bidirectional_decoder(config: Any) -> bool:
    return bool(getattr(config, "use_bidirectional_attention", False))


def encoder_attention_mask(
    config: Any, attention_mask: torch.Tensor
) -> torch.Tensor | dict[str, torch.Tensor]:
    """What to pass as ``attention_mask``: the (batch, seq) mask itself for BERT-family models, an
    additive (batch, 1, seq, seq) mask per layer type for bidirectional decoders."""
    if not is_bidirectional_decoder(config):
        return attention_mask
    blocked = torch.finfo(torch.float32).min
    keys = attention_mask[:, None, None, :].to(torch.bool)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    masks: dict[str, torch.Tensor] = {}
    for layer_type in set(config.layer_types):
        allowed = keys
        if layer_type == "sliding_attention" and getattr(config, "sliding_window", None):
            distance = (positions[None, :] - positions[:, None]).abs()
            allowed = keys & (distance < int(config.sliding_window))[None, None, :, :]
        else:
            allowed = allowed.expand(-1, -1, attention_mask.shape[1], -1)
        masks[layer_type] = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, blocked)
    return masks
