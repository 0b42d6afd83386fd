"""`medsearch models build` reuses a build only while what it was made from is unchanged: its parent's
fingerprint and the committed files it reads (a trained delta, an int8 plan)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import models.registry as registry
from models.manifest import ModelManifest, read_manifest, write_manifest
from models.registry import Recipe


@dataclass
class Built:
    made: list[str]  # the models made, in order
    weights: Path  # the parent's "download"
    plan: Path  # the child's committed input
    models: Path


@pytest.fixture
def built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Built:
    """A parent (weights from a 'download') and a child that reads a committed plan file, both built."""
    made: list[str] = []
    weights = tmp_path / "download.bin"
    plan = tmp_path / "child.plan.json"
    weights.write_text("weights v1")
    plan.write_text('{"keep_float": []}')

    def make(source: Path) -> Callable[[Path, Path | None, registry.Progress], ModelManifest]:
        def run(out: Path, parent: Path | None, _progress: registry.Progress) -> ModelManifest:
            made.append(out.name)
            out.mkdir(parents=True, exist_ok=True)
            body = source.read_text() + (read_manifest(parent).fingerprint if parent else "")
            (out / "model.bin").write_text(body)
            manifest = ModelManifest(
                name=out.name, role="query", format="onnx", architecture="Tiny", pooling="mean",
                max_tokens=8, dim=4, space="tiny",
            )  # fmt: skip
            return write_manifest(out, manifest)

        return run

    monkeypatch.setattr(
        registry,
        "RECIPES",
        {
            "parent": Recipe("parent", "downloaded", None, make(weights)),
            "child": Recipe("child", "planned", "parent", make(plan), inputs=lambda _n: [plan]),
        },
    )
    models = tmp_path / "models"
    registry.build("child", models, progress=lambda _m: None)
    return Built(made, weights, plan, models)


def test_a_current_build_is_reused(built: Built) -> None:
    assert built.made == ["parent", "child"]
    recorded = read_manifest(built.models / "child").built_from
    assert recorded["parent"] == read_manifest(built.models / "parent").fingerprint
    assert "child.plan.json" in recorded
    messages: list[str] = []
    registry.build("child", built.models, progress=messages.append)
    assert built.made == ["parent", "child"]
    assert messages == [f"child: already built ({built.models / 'child'})"]


def test_a_changed_committed_input_rebuilds_only_its_model(built: Built) -> None:
    built.plan.write_text('{"blockwise": ["down_proj"]}')  # a pull changed the committed plan
    messages: list[str] = []
    registry.build("child", built.models, progress=messages.append)
    assert built.made == ["parent", "child", "child"]
    assert any("building again" in m for m in messages)
    assert (built.models / "child" / "model.bin").read_text().startswith('{"blockwise"')


def test_a_rebuilt_parent_rebuilds_its_children(built: Built) -> None:
    built.weights.write_text("weights v2")
    registry.build("parent", built.models, progress=lambda _m: None)  # nothing it records changed
    assert built.made == ["parent", "child"]
    (built.models / "parent" / "manifest.json").unlink()  # gone: built again, with other weights
    registry.build("child", built.models, progress=lambda _m: None)
    assert built.made == ["parent", "child", "parent", "child"]
