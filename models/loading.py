"""The one place that picks an encoder runtime: the manifest's ``format`` names it.

Apart from the interface (``models.encoder``) so that the runtimes, which import the interface's
types, are not imported back by it.
"""

from __future__ import annotations

from pathlib import Path

from models.encoder import Device, EncodeMode, Encoder, Precision
from models.manifest import read_manifest


def load_encoder(
    model_dir: Path,
    threads: int = 0,
    device: Device = "auto",
    mode: EncodeMode = "document",
    precision: Precision = "fp32",
) -> Encoder:
    """Open the encoder in ``model_dir`` with the runtime its manifest names.

    ``precision`` applies to the transformers runtime (models/precision.py: a fast path is used only
    when it passes the quality gate); an ONNX graph runs in the precision it was exported in.

    torch is imported only for ``format == "hf"``: the service, which loads ONNX query encoders,
    never imports it.
    """
    manifest = read_manifest(model_dir)
    if manifest.format == "onnx":
        from models.onnx_encoder import OnnxEncoder

        return OnnxEncoder(model_dir, manifest=manifest, threads=threads)
    from models.hf_encoder import HFEncoder

    return HFEncoder(
        model_dir, manifest=manifest, threads=threads, device=device, mode=mode, precision=precision
    )
