"""`medsearch models build` reuses a build only while what it was made from is unchanged: its parent's
fingerprint and the committed files it reads (a trained delta, an int8 plan)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import models.registry as registry
from models.manifest import ModelManifest, read_manifest, write_manifest
from models.registry import Recipe


@pytest.fixture
def recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], Path, Path]:
    """A parent (weights from a 'download') and a child that reads a committed plan file."""
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
    return made, weights, plan


def test_a_current_build_is_reused(recipes: tuple[list[str], Path, Path], tmp_path: Path) -> None:
    made, _, _ = recipes
    models = tmp_path / "models"
    registry.build("child", models, progress=lambda _m: None)
    assert made == ["parent", "child"]
    recorded = read_manifest(models / "child").built_from
    assert (
        recorded["parent"] == read_manifest(models / "parent").fingerprint and "child.plan.json" in recorded
    )
    messages: list[str] = []
    registry.build("child", models, progress=messages.append)
    assert made == ["parent", "child"]
    assert messages == ["child: already built (" + str(models / "child") + ")"]


def test_a_changed_committed_input_rebuilds_only_its_model(
    recipes: tuple[list[str], Path, Path], tmp_path: Path
) -> None:
    made, _, plan = recipes
    models = tmp_path / "models"
    registry.build("child", models, progress=lambda _m: None)
    plan.write_text('{"blockwise": ["down_proj"]}')  # a pull changed the committed plan
    messages: list[str] = []
    registry.build("child", models, progress=messages.append)
    assert made == ["parent", "child", "child"]
    assert any("building again" in m for m in messages)
    assert (models / "child" / "model.bin").read_text().startswith('{"blockwise"')


def test_a_rebuilt_parent_rebuilds_its_children(
    recipes: tuple[list[str], Path, Path], tmp_path: Path
) -> None:
    made, weights, _ = recipes
    models = tmp_path / "models"
    registry.build("child", models, progress=lambda _m: None)
    weights.write_text("weights v2")
    registry.build("parent", models, progress=lambda _m: None)  # still current: nothing it records changed
    assert made == ["parent", "child"]
    (models / "parent" / "manifest.json").unlink()  # gone: built again, with other weights
    registry.build("child", models, progress=lambda _m: None)
    assert made == ["parent", "child", "parent", "child"]
