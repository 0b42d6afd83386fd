"""The trainable document side: a decoder-stack encoder (a decoder LLM, or an LLM embedder such as
EmbeddingGemma), frozen, with its top layers trainable, or LoRA.

Inputs go through the transformers runtime's own tokenization and collation (``HFEncoder``: prompt,
truncation, EOS appended, left padding, positions counting real tokens) and the shared pooling, so a
trained document side encodes exactly as the rebuilt encoder will at indexing time. The model stays
in eval mode: decoder LLMs have no dropout to turn on, and eval keeps the steps deterministic.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm

from models.align.lora import DEFAULT_LORA_TARGETS, LoRALinear, wrap_linears
from models.align.state_cache import LowerStateCache
from models.hf_encoder import HFEncoder
from models.manifest import ModelManifest, read_manifest
from models.pooling import finish, pool

DocumentMode = Literal["frozen", "top_layers", "lora"]


class DocumentSideConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: DocumentMode = "frozen"
    trainable_layers: int | None = Field(
        default=None,
        gt=0,
        description="top_layers: how many top decoder layers train (required). "
        "lora: LoRA only on the top N layers (None: every layer).",
    )
    lora_rank: int = Field(default=32, gt=0)
    lora_alpha: float = Field(default=64.0, gt=0)
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    cache_lower_states: bool = Field(
        default=False, description="Run the frozen lower layers once per text and keep their output."
    )
    cache_dtype: Literal["float32", "bfloat16"] = "float32"
    max_tokens: int | None = Field(
        default=None, gt=0, description="Training truncation (manifest's if None)."
    )
    output_dim: int | None = Field(
        default=None,
        gt=0,
        description="Keep the first N dimensions (Matryoshka-style truncation; manifest's if None), "
        "e.g. to share a space with a smaller query encoder without a projection.",
    )


class _Passthrough(nn.Module):
    """Stands in for a decoder layer: returns the hidden states it gets, recording them if asked."""

    def __init__(self, record: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.record = record

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.record is not None:
            self.record.append(hidden_states)
        return hidden_states


@contextmanager
def _replaced(layers: nn.ModuleList, replacements: dict[int, nn.Module]) -> Iterator[None]:
    """Swap some decoder layers for stand-ins for one forward; the model's own loop (masks, rotary
    positions, per-layer attention types) runs unchanged around them."""
    originals = {i: layers[i] for i in replacements}
    try:
        for i, module in replacements.items():
            layers[i] = module
        yield
    finally:
        for i, module in originals.items():
            layers[i] = module


class DocumentTower:
    """Encodes documents with gradients flowing into the trainable part only."""

    def __init__(
        self, model_dir: Path, config: DocumentSideConfig, *, seed: int = 0, threads: int = 0
    ) -> None:
        base: ModelManifest = read_manifest(model_dir)
        self.model_dir = model_dir
        self.config = config
        self.base_manifest = base
        if config.output_dim is not None and config.output_dim > base.dim:
            raise ValueError(f"output_dim {config.output_dim} exceeds {base.name}'s dim {base.dim}")
        overrides = {"max_tokens": config.max_tokens, "dim": config.output_dim}
        manifest = base.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        self.encoder = HFEncoder(model_dir, manifest, threads=threads, device="cpu")
        self.model: Any = self.encoder.model
        self.model.requires_grad_(False)
        self.encoder.dense.requires_grad_(False)
        layers = getattr(self.model, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"{model_dir}: the document side must be a decoder-stack model (Gemma, Qwen)")
        self.layers: nn.ModuleList = layers
        self.first_trainable = self._make_trainable(seed)
        self._base_values = {
            name: p.detach().clone()
            for name, p in self.model.named_parameters()
            if config.mode == "top_layers" and p.requires_grad
        }
        self.cache: LowerStateCache | None = None
        if config.cache_lower_states:
            if not 0 < self.first_trainable < len(self.layers):
                raise ValueError("caching lower states needs some frozen layers below trainable ones")
            self.cache = LowerStateCache(
                self.first_trainable, base.fingerprint, getattr(torch, config.cache_dtype)
            )

    def _make_trainable(self, seed: int) -> int:
        """Unfreeze what the mode trains; returns the index of the first layer that changes."""
        total = len(self.layers)
        mode, top = self.config.mode, self.config.trainable_layers
        if mode == "frozen":
            return total
        if mode == "top_layers" and top is None:
            raise ValueError("top_layers mode needs trainable_layers")
        count = min(top or total, total)
        first = total - count
        if mode == "top_layers":
            for layer in self.layers[first:]:
                layer.requires_grad_(True)
            final_norm = getattr(self.model, "norm", None)
            if isinstance(final_norm, nn.Module):
                final_norm.requires_grad_(True)
        else:
            wrap_linears(
                list(self.layers[first:]),
                self.config.lora_targets,
                self.config.lora_rank,
                self.config.lora_alpha,
                seed,
            )
        return first

    @property
    def manifest(self) -> ModelManifest:
        return self.encoder.manifest

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.trainable_parameters().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable_parameters()
        if set(state) != set(params):
            raise ValueError("the saved document-side state does not match this configuration")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def base_values(self) -> dict[str, torch.Tensor]:
        """The base-model tensors a delta of this tower changes, by their names in the base model."""
        if self.config.mode == "top_layers":
            return dict(self._base_values)
        return {
            f"{name}.weight": module.base.weight.detach()
            for name, module in self.model.named_modules()
            if isinstance(module, LoRALinear)
        }

    def delta_tensors(self) -> dict[str, torch.Tensor]:
        """What a delta file stores: trained minus base weights (top layers) or the LoRA factors."""
        trained = self.trainable_state()
        if self.config.mode == "top_layers":
            return {name: value - self._base_values[name] for name, value in trained.items()}
        return trained

    def _fill_cache(self, rows: Sequence[list[int]]) -> None:
        assert self.cache is not None
        todo = list({tuple(r): r for r in rows if r not in self.cache}.values())
        if not todo:
            return
        batch = self.encoder.collate(todo)
        record: list[torch.Tensor] = []
        stand_ins: dict[int, nn.Module] = {
            i: _Passthrough() for i in range(self.first_trainable, len(self.layers))
        }
        stand_ins[self.first_trainable] = _Passthrough(record)
        with torch.no_grad(), _replaced(self.layers, stand_ins):
            self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
            )
        width = batch.input_ids.shape[1]
        for i, row in enumerate(todo):
            span = (
                slice(width - len(row), width) if self.encoder.padding_side == "left" else slice(0, len(row))
            )
            self.cache.put(row, record[0][i, span])

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), dim) unit vectors; differentiable in the trainable parameters."""
        rows = self.encoder.tokenize(texts)
        batch = self.encoder.collate(rows)
        inputs: dict[str, torch.Tensor] = {
            "attention_mask": batch.attention_mask,
            "position_ids": batch.position_ids,
        }
        if self.cache is None:
            hidden = self.model(input_ids=batch.input_ids, **inputs).last_hidden_state
        else:
            self._fill_cache(rows)
            states = self.cache.batch(rows, self.encoder.padding_side)
            skipped: dict[int, nn.Module] = {i: _Passthrough() for i in range(self.first_trainable)}
            with _replaced(self.layers, skipped):
                hidden = self.model(inputs_embeds=states, **inputs).last_hidden_state
        # An embedder's Dense layers (EmbeddingGemma) stay frozen after the pooling, as at indexing.
        pooled = self.encoder.dense(pool(hidden.float(), batch.attention_mask, self.manifest.pooling))
        return finish(pooled, self.manifest.dim, self.manifest.normalize)

    def encode(self, texts: Sequence[str], batch_size: int = 16, *, progress: bool = False) -> torch.Tensor:
        """No-grad vectors in the caller's order (stage-I targets, dense negative mining); batched
        longest first (by characters, a close enough proxy for tokens) so little goes to padding."""
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        out = torch.zeros((len(texts), self.dim))
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        with torch.no_grad(), tqdm(total=len(texts), desc="document vectors", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                out[chunk] = self.embed([texts[i] for i in chunk])
                bar.update(len(chunk))
        return out
