"""A query tower cut from the teacher itself: EmbeddingGemma's first K layers with its embeddings,
final norm, mean pooling and Dense heads.

Why: a foreign tower (e5-small) has to learn the teacher's geometry from nothing and plateaus (24.3
dev after every lever of issue 13); a student made of the teacher's own first layers starts inside
the space it must reproduce (Query Encoder Distillation via Embedding Alignment, arXiv 2306.11550:
~95% of the teacher kept with documents frozen, against ~75% for a foreign tower). It stays a
bidirectional, BERT-style encoder, so it exports to ONNX and serves like e5-small; K sets its cost.

The tower tokenizes, masks (models/attention_masks.py), pools and projects exactly as its ONNX export
does, so what selection scores is what the service runs. Its trained state (K layers, final norm,
Dense heads; the 262k-row embedding table stays frozen) is saved as a query delta
(models/align/artifacts.py) against the teacher's own weights.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from models.align.trainable import TrainableTower
from models.attention_masks import encoder_attention_mask
from models.dense import load_dense_stack
from models.manifest import ModelManifest, read_manifest, write_manifest
from models.pooling import finish, pool

# Files of the teacher's tokenizer the student directory carries unchanged.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
)


class TeacherLayersConfig(BaseModel):
    """The student: the first ``layers`` of the teacher's transformer and its heads."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["teacher_layers"] = "teacher_layers"
    layers: int = Field(gt=0, description="K: the teacher's first K layers (EmbeddingGemma has 24).")
    max_tokens: int = Field(default=64, gt=0, description="Query truncation, prompt included.")
    freeze_embeddings: bool = Field(
        default=True, description="Keep the word-embedding table (262k rows) as the teacher's."
    )
    train_dense: bool = Field(default=True, description="Train the Dense heads with the layers.")


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    # Loading K of 24 layers reports the other layers' tensors as unexpected: that is the point.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def truncated_config(teacher_dir: Path, layers: int) -> Any:
    config = AutoConfig.from_pretrained(teacher_dir, local_files_only=True)
    total = int(config.num_hidden_layers)
    if layers > total:
        raise ValueError(f"{teacher_dir}: the teacher has {total} layers, not {layers}")
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[:layers]
    return config


class TeacherLayersTower(TrainableTower):
    """Query encoder with gradients; ``model`` (K layers) and ``dense`` are its trainable parts."""

    def __init__(self, teacher_dir: Path, config: TeacherLayersConfig, *, seed: int = 0) -> None:
        super().__init__()
        del seed  # nothing is initialised at random: every weight is the teacher's
        self.model_dir = teacher_dir
        self.config = config
        self.source: ModelManifest = read_manifest(teacher_dir)
        if self.source.query_prompt is None:
            raise ValueError(f"{teacher_dir}: {self.source.name} has no query prompt to distil")
        if self.source.pooling != "mean":
            raise ValueError(f"{teacher_dir}: a teacher-layers tower needs a mean-pooling teacher")
        model_config = truncated_config(teacher_dir, config.layers)
        with _quiet_loading():
            self.model: Any = AutoModel.from_pretrained(
                teacher_dir,
                config=model_config,
                local_files_only=True,
                attn_implementation="sdpa",
                dtype=torch.float32,
            ).eval()
        self.tokenizer: Any = AutoTokenizer.from_pretrained(teacher_dir, local_files_only=True)
        self.tokenizer.padding_side = "right"
        self.dense = load_dense_stack(teacher_dir, self.source.dense_layers)
        self.model.requires_grad_(True)
        if config.freeze_embeddings:
            self.model.get_input_embeddings().requires_grad_(False)
        self.dense.requires_grad_(config.train_dense)
        self.max_tokens = config.max_tokens
        self._base_values = {name: p.detach().clone() for name, p in self.trainable_parameters().items()}

    @property
    def dim(self) -> int:
        return self.source.dim

    def base_values(self) -> dict[str, torch.Tensor]:
        """The teacher's values of every tensor training changes, by parameter name."""
        return dict(self._base_values)

    def apply_delta(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add trained-minus-base ``tensors`` (by parameter name) to the teacher's weights."""
        params = dict(self.named_parameters())
        unknown = [k for k in tensors if k not in params]
        if unknown:
            raise KeyError(unknown[0])
        with torch.no_grad():
            for key, value in tensors.items():
                params[key].add_(value.float())

    def render(self, texts: Sequence[str]) -> list[str]:
        return [self.source.render_query(text) for text in texts]

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), dim) unit vectors, with gradients when training."""
        encoded = self.tokenizer(
            self.render(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        mask = encoded["attention_mask"]
        hidden = self.model(
            input_ids=encoded["input_ids"], attention_mask=encoder_attention_mask(self.model.config, mask)
        ).last_hidden_state
        pooled = self.dense(pool(hidden.float(), mask, "mean"))
        return finish(pooled.float(), self.dim, normalize=True)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """No-grad vectors in eval mode, in the caller's order."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                parts = [self.embed(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(parts) if parts else torch.zeros((0, self.dim))

    def save(self, out_dir: Path, *, name: str, space: str) -> ModelManifest:
        """Write the student as a transformers directory (K layers, the teacher's tokenizer, its
        Dense folders with the trained weights) with a query manifest in ``space``; ``out_dir`` must
        be a fresh staging directory (``models.manifest.staged_model_dir``)."""
        self.model.save_pretrained(out_dir, safe_serialization=True)
        for file in TOKENIZER_FILES:
            if (self.model_dir / file).is_file():
                shutil.copy2(self.model_dir / file, out_dir / file)
        linears = [m for m in self.dense.modules() if isinstance(m, nn.Linear)]
        for folder, linear in zip(self.source.dense_layers, linears, strict=True):
            (out_dir / folder).mkdir(parents=True)
            shutil.copy2(self.model_dir / folder / "config.json", out_dir / folder / "config.json")
            tensors = {"linear.weight": linear.weight.detach().contiguous()}
            if linear.bias is not None:
                tensors["linear.bias"] = linear.bias.detach().contiguous()
            save_file(tensors, str(out_dir / folder / "model.safetensors"))
        (out_dir / "student.json").write_text(
            json.dumps({"teacher": self.source.name, **self.config.model_dump()}, indent=2) + "\n",
            encoding="utf-8",
        )
        manifest = self.source.model_copy(
            update={
                "name": name,
                "role": "query",
                "prompt": self.source.query_prompt,
                "max_tokens": self.max_tokens,
                "space": space,
                "matryoshka_dims": [],
                "figures": {},
                "source": f"first {self.config.layers} layers of {self.source.name} "
                f"({self.source.fingerprint[:12]}), distilled",
                # Trained weights, not an export of the teacher: evaluation must not pair it as one.
                "derived_from": "",
            }
        )
        return write_manifest(out_dir, manifest)
