"""Load a local transformers encoder the one way both the export and the transformers runtime need."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel


def load_hf_model(model_dir: Path, attn_implementation: str) -> Any:
    """Local files only, no remote code, float32, eval mode.

    Our pooling replaces any built-in pooler head, so BERT-family models are built without one; that
    also stops transformers from reporting the (never used) pooler weights as missing.
    """
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    model_class: Any = AutoModel._model_mapping[type(config)]
    extra: dict[str, Any] = {}
    if "add_pooling_layer" in inspect.signature(model_class).parameters:
        extra["add_pooling_layer"] = False
    model = AutoModel.from_pretrained(
        model_dir,
        local_files_only=True,
        trust_remote_code=False,
        attn_implementation=attn_implementation,
        dtype=torch.float32,
        **extra,
    )
    return model.eval()
