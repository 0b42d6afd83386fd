"""sentence-transformers Dense modules (``N_Dense/``: config.json + model.safetensors) as torch layers.

An LLM embedder such as EmbeddingGemma projects its mean-pooled state through Dense layers before
normalizing; the manifest lists their folders in order (``dense_layers``) and both the transformers
runtime and the alignment code apply them through this one loader.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from models.manifest import ManifestError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "torch.nn.modules.linear.Identity": nn.Identity,
    "torch.nn.modules.activation.Tanh": nn.Tanh,
}


def load_dense(folder: Path) -> nn.Sequential:
    """One Dense module: its linear map and activation, float32, frozen, eval mode."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        weights = load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{folder}: unreadable Dense module ({exc})") from exc
    activation = config.get("activation_function", "torch.nn.modules.linear.Identity")
    if activation not in ACTIVATIONS:
        raise ManifestError(f"{folder}: unsupported Dense activation {activation!r}")
    bias = bool(config.get("bias", True))
    linear = nn.Linear(int(config["in_features"]), int(config["out_features"]), bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weights["linear.weight"].float())
        if bias:
            linear.bias.copy_(weights["linear.bias"].float())
    return nn.Sequential(linear, ACTIVATIONS[activation]()).requires_grad_(False).eval()


def load_dense_stack(model_dir: Path, folders: Sequence[str]) -> nn.Sequential:
    """Every Dense module the manifest names, in order (empty: the identity)."""
    return nn.Sequential(*(load_dense(model_dir / folder) for folder in folders))


def output_width(stack: nn.Sequential, hidden_size: int) -> int:
    linears = [m for m in stack.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features) if linears else hidden_size
