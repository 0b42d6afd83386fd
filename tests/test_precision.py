"""Fast paths of the transformers runtime (bf16, int8) and the quality gate that admits them."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import precision as precision_module
from models.hf_encoder import CUDA_BATCH_SIZE, HFEncoder
from models.loading import load_encoder
from models.manifest import read_manifest
from models.precision import PrecisionError, fast_path_for
from models.precision_gate import GATE_TEXTS, MIN_GATE_COSINE, check, row_cosines
from tests.test_hf_encoder import TEXTS

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def _encoder(model_dir: Path, precision: str) -> HFEncoder:
    return HFEncoder(model_dir, read_manifest(model_dir), device="cpu", precision=precision)  # type: ignore[arg-type]


def _noisy(model: nn.Module) -> nn.Module:
    """A broken fast path: float32 weights with large noise."""
    bad = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bad.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * p.std().clamp(min=1e-3))
    return bad


@pytest.fixture
def bad_fast_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(precision_module.FAST_PATHS, "int8", _noisy)
    monkeypatch.setitem(precision_module.FAST_PATHS, "bf16", _noisy)


@pytest.mark.parametrize(
    ("requested", "device", "cpu_bf16", "expected"),
    [
        ("fp32", CPU, False, None),
        ("fp32", CUDA, True, None),
        ("auto", CUDA, False, "bf16"),
        ("bf16", CUDA, False, "bf16"),
        ("auto", CPU, True, "bf16"),
        ("auto", CPU, False, "int8"),
        ("int8", CPU, True, "int8"),
        ("bf16", CPU, False, "bf16"),
    ],
)
def test_which_fast_path_is_tried(
    requested: str, device: torch.device, cpu_bf16: bool, expected: str
) -> None:
    assert fast_path_for(requested, device, cpu_bf16) == expected  # type: ignore[arg-type]


def test_int8_is_refused_on_cuda() -> None:
    with pytest.raises(PrecisionError):
        fast_path_for("int8", CUDA, cpu_bf16=False)


def test_fp32_runs_no_gate_and_keeps_the_model(tiny_bert: Path) -> None:
    encoder = _encoder(tiny_bert, "fp32")
    assert encoder.precision == "fp32" and encoder.gate is None
    assert not any("quantized" in type(m).__module__ for m in encoder.model.modules())
    np.testing.assert_array_equal(encoder.encode(TEXTS), load_encoder(tiny_bert, device="cpu").encode(TEXTS))


@pytest.mark.parametrize(("fixture", "precision"), [("tiny_bert", "int8"), ("tiny_gemma", "bf16")])
def test_a_fast_path_that_passes_stays_close_to_fp32(
    fixture: str, precision: str, request: pytest.FixtureRequest
) -> None:
    model_dir = Path(request.getfixturevalue(fixture))
    fast = _encoder(model_dir, precision)
    assert fast.precision == precision
    assert fast.gate is not None and fast.gate.passed and fast.gate.min_cosine >= MIN_GATE_COSINE
    if precision == "int8":
        assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in fast.model.modules())
    else:
        assert next(fast.model.parameters()).dtype == torch.bfloat16
    reference = _encoder(model_dir, "fp32").encode(TEXTS, batch_size=4)
    vectors = fast.encode(TEXTS, batch_size=4)
    assert vectors.dtype == np.float32 and vectors.shape == reference.shape
    assert row_cosines(reference, vectors).min() >= MIN_GATE_COSINE


def test_the_gate_falls_back_to_fp32_and_says_why(
    tiny_bert: Path, bad_fast_paths: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="medsearch.models"):
        encoder = _encoder(tiny_bert, "int8")
    assert encoder.precision == "fp32"
    assert encoder.gate is not None and not encoder.gate.passed
    assert encoder.gate.min_cosine < MIN_GATE_COSINE and encoder.gate.texts == len(GATE_TEXTS)
    lines = [r.getMessage() for r in caplog.records if r.name == "medsearch.models"]
    assert len(lines) == 1 and "int8 failed the quality gate" in lines[0] and "float32" in lines[0]
    # The fallback is the float32 model itself, not the broken copy.
    np.testing.assert_array_equal(encoder.encode(TEXTS), _encoder(tiny_bert, "fp32").encode(TEXTS))


def test_auto_picks_fp32_on_a_cpu_where_the_gate_fails(
    tiny_gemma: Path, bad_fast_paths: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("models.hf_encoder.native_cpu_bf16", lambda: False)
    encoder = load_encoder(tiny_gemma, device="cpu", precision="auto")
    assert isinstance(encoder, HFEncoder)
    assert encoder.precision == "fp32"
    assert encoder.gate is not None and encoder.gate.precision == "int8" and not encoder.gate.passed


def test_auto_tries_bf16_on_a_cpu_with_native_bf16(tiny_gemma: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("models.hf_encoder.native_cpu_bf16", lambda: True)
    encoder = load_encoder(tiny_gemma, device="cpu", precision="auto")
    assert isinstance(encoder, HFEncoder)
    assert encoder.gate is not None and encoder.gate.precision == "bf16"


@pytest.mark.parametrize(("fixture", "precision"), [("tiny_bert", "int8"), ("tiny_gemma", "bf16")])
def test_batch_invariance_of_a_fast_path(
    fixture: str, precision: str, request: pytest.FixtureRequest
) -> None:
    """bf16 keeps batch invariance up to rounding; dynamic int8 scales activations per batch, so a
    document's vector moves with its batch mates, within the gate's tolerance."""
    encoder = _encoder(Path(request.getfixturevalue(fixture)), precision)
    assert encoder.precision == precision
    alone = np.stack([encoder.encode([text])[0] for text in TEXTS])
    for batch_size in (len(TEXTS), 4, 2):
        together = encoder.encode(TEXTS, batch_size=batch_size)
        assert row_cosines(alone, together).min() >= MIN_GATE_COSINE


def test_the_gate_checks_every_row() -> None:
    reference = np.eye(3, dtype=np.float32)
    assert check("int8", reference, reference.copy()).passed
    off = reference.copy()
    off[2] = [0.0, 0.1, 1.0]
    result = check("int8", reference, off)
    assert (
        not result.passed and result.min_cosine < MIN_GATE_COSINE and result.mean_cosine > result.min_cosine
    )
    broken = reference.copy()
    broken[0] = np.nan
    assert check("int8", reference, broken).min_cosine == -1.0


def test_cuda_batches_are_large(tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA ``encode`` takes at least CUDA_BATCH_SIZE documents per batch (checked on CPU by
    setting the floor the CUDA device sets)."""
    encoder = _encoder(tiny_bert, "fp32")
    assert encoder.min_batch_size == 1
    sizes: list[int] = []
    embed = encoder._embed
    monkeypatch.setattr(encoder, "_embed", lambda ids: sizes.append(len(ids)) or embed(ids))
    texts = TEXTS * 30
    encoder.encode(texts, batch_size=4)
    assert max(sizes) == 4
    sizes.clear()
    encoder.min_batch_size = CUDA_BATCH_SIZE
    encoder.encode(texts, batch_size=4)
    assert sizes == [CUDA_BATCH_SIZE, len(texts) - CUDA_BATCH_SIZE]
