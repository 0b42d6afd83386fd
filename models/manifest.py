"""The manifest that travels with every built encoder (``manifest.json`` beside the weights).

It is the single source of truth for how an encoder turns text into a vector and, through ``space``,
which other encoders' vectors it can be compared with. The service refuses a query encoder whose space
differs from the collection's document space.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FILE = "manifest.json"

Role = Literal["query", "document"]
Pooling = Literal["cls", "mean", "last_token"]
WeightFormat = Literal["onnx", "hf"]


class ManifestError(RuntimeError):
    """A model directory is missing, incomplete or does not match its manifest."""


class ModelDirRefusedError(ManifestError):
    """A build's output path exists and is not a model directory it may replace; it is left as is."""


class ModelManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Short unique name of this built encoder.")
    role: Role
    format: WeightFormat = Field(description="onnx: onnxruntime graph; hf: transformers directory.")
    architecture: str = Field(description="Model class, e.g. BertModel or Gemma3TextModel.")
    decoder_only: bool = False
    pooling: Pooling
    normalize: bool = True
    prompt: str = Field(default="{text}", description="Template applied to every input; must hold {text}.")
    query_prompt: str | None = Field(
        default=None,
        description="Template when a document encoder also encodes queries (LLM-symmetric reference, "
        "alignment teacher); None: it has no query mode of its own.",
    )
    dense_layers: list[str] = Field(
        default_factory=list,
        description="sentence-transformers Dense module folders applied in order after pooling.",
    )
    matryoshka_dims: list[int] = Field(
        default_factory=list, description="Output dims the model was trained to be truncated to."
    )
    max_tokens: int = Field(gt=0, description="Inputs are truncated to this many tokens, specials included.")
    dim: int = Field(gt=0, description="Output dimension (after optional truncation to the first N dims).")
    space: str = Field(description="Vector space id: only encoders with equal spaces are comparable.")
    fingerprint: str = Field(default="", description="sha256 over the weight files (see files).")
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256")
    source: str = Field(default="", description="Where the weights came from.")
    derived_from: str = Field(
        default="",
        description="Fingerprint of the transformers model these weights were exported from (if any).",
    )
    quantization: str | None = None
    built_from: dict[str, str] = Field(
        default_factory=dict,
        description="What `medsearch models build` made this from: 'parent' -> the parent build's "
        "fingerprint, committed input file name (delta, int8 plan) -> sha256. A change rebuilds it.",
    )
    license: str = ""
    card: str = Field(default="", description="Model card: data, recipe, figures (a repository path).")
    figures: dict[str, float] = Field(
        default_factory=dict,
        description="Measured quality of this encoder in its pair, from its card, e.g. "
        "{'cmedqa-im dev nDCG@10': 27.0}; empty when unmeasured.",
    )

    @property
    def encoding_fingerprint(self) -> str:
        """sha256 over everything that decides a vector: the weights and the manifest fields that turn
        text into a vector. ``fingerprint`` names the weights alone (deltas and exports record it as
        their base); collections and content hashes use this one, so editing a prompt, the pooling,
        the truncation or the normalization of a built encoder makes every document read as changed."""
        shaping = self.model_dump(
            include={
                "architecture",
                "decoder_only",
                "pooling",
                "normalize",
                "prompt",
                "query_prompt",
                "dense_layers",
                "max_tokens",
                "dim",
            }
        )
        identity = json.dumps([self.fingerprint, shaping], sort_keys=True)
        return hashlib.sha256(identity.encode()).hexdigest()

    def text_budget(self, overhead: int) -> int:
        """Tokens of text one input holds when the prompt and special tokens take ``overhead``."""
        budget = self.max_tokens - overhead
        if budget <= 0:
            raise ManifestError(f"{self.name}: the prompt fills all {self.max_tokens} tokens")
        return budget

    def render(self, text: str) -> str:
        return self.prompt.replace("{text}", text)

    def render_query(self, text: str) -> str:
        if self.query_prompt is None:
            raise ManifestError(f"{self.name} has no query prompt: it does not encode queries")
        return self.query_prompt.replace("{text}", text)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_files(model_dir: Path) -> dict[str, str]:
    """sha256 of every file in ``model_dir`` (recursively) except the manifest itself."""
    return {
        str(p.relative_to(model_dir)): sha256_file(p)
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


def fingerprint_of(files: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()


def write_manifest(model_dir: Path, manifest: ModelManifest) -> ModelManifest:
    """Hash the directory's files, fill ``files``/``fingerprint`` and write ``manifest.json``."""
    files = hash_files(model_dir)
    sealed = manifest.model_copy(update={"files": files, "fingerprint": fingerprint_of(files)})
    (model_dir / MANIFEST_FILE).write_text(sealed.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return sealed


def read_manifest(model_dir: Path) -> ModelManifest:
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{path} not found")
    try:
        return ModelManifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:
        raise ManifestError(f"{path}: invalid manifest: {exc}") from exc


def verify_manifest(model_dir: Path) -> ModelManifest:
    """Read the manifest and check every listed file against its sha256."""
    manifest = read_manifest(model_dir)
    actual = hash_files(model_dir)
    for name, digest in manifest.files.items():
        if name not in actual:
            raise ManifestError(f"{model_dir}: {name} is missing")
        if actual[name] != digest:
            raise ManifestError(f"{model_dir}: {name} does not match its sha256 in the manifest")
    return manifest


def named_model_dir(models_dir: Path, name: str) -> Path:
    """The directory of the model called ``name`` inside ``models_dir``; a name that would lead
    outside it (a separator, '..', an absolute path) is refused rather than followed."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ManifestError(
            f"model name {name!r} is not a directory name inside {models_dir}; name a built model "
            "(medsearch models list) or give the path of a model directory"
        )
    return models_dir / name


def check_replaceable(target: Path, name: str | None = None) -> None:
    """Refuse (``ModelDirRefusedError``) to replace ``target`` unless it is absent, an empty directory
    or a model directory (of the model called ``name``, when given): a mistyped path is never deleted.

    A model directory whose manifest is damaged is replaceable: rebuilding it is the repair."""
    if not target.exists():
        return
    fix = "move it away or choose another directory"
    if not target.is_dir():
        raise ModelDirRefusedError(f"refusing to replace {target}: it is not a directory; {fix}")
    if not (target / MANIFEST_FILE).is_file():
        if any(target.iterdir()):
            raise ModelDirRefusedError(
                f"refusing to replace {target}: it is not empty and is not a model directory "
                f"(no {MANIFEST_FILE}); {fix}"
            )
        return
    if name is None:
        return
    try:
        held = read_manifest(target).name
    except ManifestError:
        return
    if held != name:
        raise ModelDirRefusedError(f"refusing to replace {target}: it holds another model ({held}); {fix}")


def built_models(models_dir: Path) -> Iterator[tuple[Path, ModelManifest | ManifestError]]:
    """Each model directory in ``models_dir``, by name (hidden ones, builds in progress, left out),
    with its manifest or the ManifestError that says why it has none."""
    for path in sorted(p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            yield path, read_manifest(path)
        except ManifestError as exc:
            yield path, exc


def model_dir(models_dir: Path, name: str) -> Path:
    """A model given on the command line: a name lives in ``models_dir`` (and never leads outside it,
    see ``named_model_dir``); an explicit path to an existing directory is taken as is."""
    path = Path(name)
    if path.is_dir() and ("/" in name or name.startswith(".")):
        return path
    return named_model_dir(models_dir, name)


def replace_model_dir(built: Path, target: Path) -> None:
    """Swap a finished build into place so readers never see a half-written model directory.

    Only an empty or a model directory (one with a manifest) is replaced: ``--out var/models`` or any
    other directory of someone's files is refused, never deleted. The old model is moved aside, not
    deleted, until the new one is in place, and moved back when that fails.
    """
    check_replaceable(target)
    if not target.exists():
        built.rename(target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    try:
        built.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _make_readable(model_dir: Path) -> None:
    """mkdtemp makes the directory owner-only; a built model is meant to be shared (images, CI, a
    service running as another user)."""
    model_dir.chmod(0o755)
    for path in model_dir.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


@contextmanager
def staged_model_dir(target: Path, name: str | None = None) -> Iterator[Path]:
    """A fresh directory beside ``target`` to build a model in; when the block ends without an error
    it replaces ``target`` (``replace_model_dir``), otherwise it is removed and ``target`` is left as
    it was. ``target`` is checked first (``check_replaceable``, with ``name``), so a refusal comes
    before a long build, not after it."""
    check_replaceable(target, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield work
        _make_readable(work)
        replace_model_dir(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
