"""The optional linear projection of an aligned query encoder, stored beside its HF weights.

When a small query encoder is aligned into a document space of another width (e5-small's 384 into
Gemma's 640), training adds a bias-free linear map applied after pooling, before normalization. It
lives in ``projection.safetensors`` (``weight``: (out, in)) so the HF directory stays a plain
transformers model; the ONNX export bakes it into the graph.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PROJECTION_FILE = "projection.safetensors"


def load_projection(model_dir: Path) -> nn.Linear | None:
    """The projection saved in ``model_dir``, if there is one."""
    path = model_dir / PROJECTION_FILE
    if not path.is_file():
        return None
    weight = load_file(str(path))["weight"].float()
    projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        projection.weight.copy_(weight)
    return projection


def save_projection(projection: nn.Linear, model_dir: Path) -> None:
    save_file({"weight": projection.weight.detach().float().contiguous()}, str(model_dir / PROJECTION_FILE))
