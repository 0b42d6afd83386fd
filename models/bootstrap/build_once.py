"""Build a default model once: reuse a verified earlier build, else build it beside its directory and
swap it in (``models.manifest.staged_model_dir``), so a failed or interrupted build never leaves a
half-written model and never deletes anything but an earlier build of the same model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from models.manifest import (
    MANIFEST_FILE,
    ManifestError,
    ModelManifest,
    check_replaceable,
    staged_model_dir,
    verify_manifest,
)

Progress = Callable[[str], None]


def _always(_manifest: ModelManifest) -> bool:
    return True


def _reusable(
    out_dir: Path, name: str, progress: Progress, current: Callable[[ModelManifest], bool] = _always
) -> ModelManifest | None:
    """The manifest of an intact earlier build of ``name`` in ``out_dir`` that ``current`` accepts, or
    None when it must be (re)built. Raises ``ModelDirRefusedError`` when ``out_dir`` is anything else
    than such a build, an empty directory or nothing."""
    check_replaceable(out_dir, name)
    if not (out_dir / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = verify_manifest(out_dir)
    except ManifestError as exc:
        progress(f"rebuilding {out_dir}: {exc}")
        return None
    if not current(manifest):
        progress(f"rebuilding {out_dir}: it was built with other settings")
        return None
    return manifest


def build_once(
    out_dir: Path,
    name: str,
    build: Callable[[Path], ModelManifest],
    progress: Progress,
    current: Callable[[ModelManifest], bool] = _always,
) -> ModelManifest:
    """``build(work_dir)`` writes the model and its manifest into an empty staging directory; it runs
    only when ``out_dir`` holds no reusable build (see ``_reusable``)."""
    existing = _reusable(out_dir, name, progress, current)
    if existing is not None:
        progress(f"{out_dir}: verified {name} build present, nothing to do")
        return existing
    with staged_model_dir(out_dir) as work:
        manifest = build(work)
    progress(f"{name} ready in {out_dir}")
    return manifest
