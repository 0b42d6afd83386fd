"""The trainable query side: a BERT-family encoder, pooled, optionally projected to the document dim.

Queries get CARE's instruction template; tokenization (right padding, truncation with the specials
kept) and pooling are those of the ONNX runtime and the export wrapper, so the trained tower and its
export encode a query identically. A projection, when the dims differ, lives beside the HF weights in
``projection.safetensors`` (``weight``: (out, in), no bias) and is applied after pooling, before
normalization.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import AutoTokenizer

from models.align.trainable import TrainableTower
from models.hf_loading import load_hf_model
from models.manifest import MANIFEST_FILE, ModelManifest, read_manifest
from models.pooling import finish, pool
from models.projection import load_projection

CARE_TEMPLATE = "<instruct>{task}\n<query>{text}"
# CARE's retrieval instruction (its stage-II MedTEB retrieval data uses this prompt).
DEFAULT_TASK = "Given a Chinese medical question, retrieve medical documents that answer the question."


class QuerySideConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    pooling: Literal["cls", "mean"] = "cls"
    template: str = Field(default=CARE_TEMPLATE, description="Must hold {text}; {task} is the instruction.")
    task: str = DEFAULT_TASK
    output_dim: int | None = Field(default=None, gt=0, description="Project to this dim (the document's).")
    max_tokens: int | None = Field(default=None, gt=0, description="Truncation (source manifest's if None).")
    freeze_embeddings: bool = Field(
        default=True, description="Keep the word-embedding table fixed (most of a multilingual BERT's size)."
    )
    trainable_layers: int | None = Field(
        default=None,
        gt=0,
        description="Train only the top N encoder layers (and the projection); None: every layer. "
        "Keeps the shipped delta small.",
    )

    def prompt(self, task: str | None = None) -> str:
        """The manifest prompt for ``task``: the template with the instruction filled in."""
        if "{text}" not in self.template:
            raise ValueError("the query template must hold {text}")
        return self.template.replace("{task}", task or self.task)


class QueryTower(TrainableTower):
    """Encodes queries with gradients; ``model`` and ``projection`` are its trainable submodules."""

    def __init__(self, model_dir: Path, config: QuerySideConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.model_dir = model_dir
        self.config = config
        self.source: ModelManifest | None = (
            read_manifest(model_dir) if (model_dir / MANIFEST_FILE).is_file() else None
        )
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.tokenizer.padding_side = "right"
        if self.source is not None and self.source.decoder_only:
            raise ValueError(f"{model_dir}: the query side must be a BERT-family (encoder) model")
        self.model: Any = load_hf_model(model_dir, attn_implementation="sdpa")
        hidden = int(self.model.config.hidden_size)
        self.projection: nn.Linear | None = load_projection(model_dir)
        if self.projection is None and config.output_dim not in (None, hidden):
            self.projection = nn.Linear(hidden, int(config.output_dim or hidden), bias=False)
            with torch.no_grad():
                # Semi-orthogonal: every query direction survives the projection at its own length.
                nn.init.orthogonal_(self.projection.weight, generator=torch.Generator().manual_seed(seed))
        if config.output_dim is not None and self.dim != config.output_dim:
            raise ValueError(
                f"{model_dir}: its saved projection gives dim {self.dim}, not {config.output_dim}"
            )
        if config.freeze_embeddings:
            self.model.get_input_embeddings().requires_grad_(False)
        if config.trainable_layers is not None:
            layers = self.model.encoder.layer  # BERT-family layout (BERT, XLM-R)
            self.model.requires_grad_(False)
            for layer in layers[max(0, len(layers) - config.trainable_layers) :]:
                layer.requires_grad_(True)
        # What a delta is measured against: the weights as loaded, before any training.
        self._base_values = {
            name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad
        }
        self.max_tokens = config.max_tokens or (self.source.max_tokens if self.source else 512)

    @property
    def dim(self) -> int:
        if self.projection is not None:
            return int(self.projection.out_features)
        return int(self.model.config.hidden_size)

    def base_values(self) -> dict[str, torch.Tensor]:
        """The loaded model's tensors that training changes (projection excluded), by model name."""
        return dict(self._base_values)

    def render(self, texts: Sequence[str], tasks: Sequence[str | None] | None = None) -> list[str]:
        tasks = tasks if tasks is not None else [None] * len(texts)
        return [
            self.config.prompt(task).replace("{text}", text) for text, task in zip(texts, tasks, strict=True)
        ]

    def pooled(self, texts: Sequence[str], tasks: Sequence[str | None] | None = None) -> torch.Tensor:
        """Pooled encoder output before projection and normalization."""
        encoded = self.tokenizer(
            self.render(texts, tasks),
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )
        inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if "token_type_ids" in encoded:
            inputs["token_type_ids"] = torch.zeros_like(encoded["input_ids"])
        hidden = self.model(**inputs).last_hidden_state
        return pool(hidden, inputs["attention_mask"], self.config.pooling)

    def embed(self, texts: Sequence[str], tasks: Sequence[str | None] | None = None) -> torch.Tensor:
        """(len(texts), dim) unit vectors; ``tasks`` overrides the instruction per text."""
        vectors = self.pooled(texts, tasks)
        if self.projection is not None:
            vectors = self.projection(vectors)
        return finish(vectors, self.dim, normalize=True)

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, *, pooled_only: bool = False
    ) -> torch.Tensor:
        """No-grad vectors in eval mode (no dropout), in the caller's order; ``pooled_only`` stops
        before the projection and normalization."""
        step = self.pooled if pooled_only else self.embed
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                parts = [step(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        finally:
            self.train(was_training)
        width = int(self.model.config.hidden_size) if pooled_only else self.dim
        return torch.cat(parts) if parts else torch.zeros((0, width))


def fit_projection(
    tower: QueryTower, texts: Sequence[str], targets: torch.Tensor, ridge: float = 1e-2
) -> float:
    """Set the projection to the ridge least-squares map from frozen pooled features to ``targets``.

    A closed-form start for stage I: measured here, a linear map of frozen e5 features already moves
    queries toward the document space, so training starts from it instead of from a random rotation.
    Returns the mean cosine between the projected texts and their targets.
    """
    if tower.projection is None:
        raise ValueError("this query tower has no projection to fit")
    features = tower.encode(texts, pooled_only=True)
    gram = features.T @ features + ridge * torch.eye(features.shape[1])
    weight = torch.linalg.solve(gram, features.T @ targets.float()).T
    with torch.no_grad():
        tower.projection.weight.copy_(weight)
    projected = torch.nn.functional.normalize(features @ weight.T, dim=-1)
    return float((projected * torch.nn.functional.normalize(targets.float(), dim=-1)).sum(dim=-1).mean())
