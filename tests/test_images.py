"""Each image's install, reproduced without Docker: the files the Dockerfile copies, installed with
the extras it installs, into a fresh virtual environment outside the repository; then the image's
command is started. Importing from the repository root (as the other tests do) would hide a module
the image lacks."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench.spawn import wait_ready
from security.lock import check
from tests.conftest import REPO
from tests.servers import free_port, served_home

pytestmark = pytest.mark.slow
DOCKERFILE = REPO / "Dockerfile"


def build_stage_files() -> list[str]:
    """The sources the Dockerfile's build stage copies into the image (COPY src... dest)."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    stage = text.split(" AS build", 1)[1].split("\nFROM ", 1)[0]
    sources: list[str] = []
    for line in stage.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources.extend(line.split()[1:-1])
    return sources


def install_commands(venv: str) -> list[list[str]]:
    """The arguments of each ``pip install`` the build stage runs for the /opt/<venv> environment, in order.
    The extra index (PyPI's mirror of PyTorch's CPU wheels) is dropped: this machine's pip takes the
    same locked file from its wheel store, and the lock's hash admits no other."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    found = re.findall(rf"/opt/{venv}/bin/pip install ([^&\n]*)", text)
    assert found, f"the Dockerfile installs nothing into /opt/{venv}"
    commands = []
    for line in found:
        words = [w for w in shlex.split(line) if w != "--no-compile"]
        if "--extra-index-url" in words:
            at = words.index("--extra-index-url")
            del words[at : at + 2]
        commands.append(words)
    return commands


def image_like_venv(tmp_path: Path, venv: str) -> Path:
    """A venv holding the product installed from exactly the image's files, as the image does."""
    src = tmp_path / "src"
    src.mkdir()
    for name in build_stage_files():
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, src / name)
    assert check(src) is None, "the image's copy of the lock is stale"
    env_dir = tmp_path / venv
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    commands = install_commands(venv)
    # The lock first, hash-checked and unresolved; then the product alone.
    assert commands[0][:3] == ["--require-hashes", "--no-deps", "-r"], commands[0]
    assert commands[-1][-1] in (".", ".[index]") and "--no-deps" in commands[-1], commands[-1]
    for args in commands:
        subprocess.run([env_dir / "bin" / "pip", "install", "-q", *args], cwd=src, check=True)
    return env_dir


def test_each_image_installs_exactly_its_lock() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "RUN python /tmp/lock.py --root /src check" in text
    for venv, profile in (("api", "service"), ("indexer", "indexer")):
        [lock, product] = install_commands(venv)
        assert lock == ["--require-hashes", "--no-deps", "-r", f"requirements/{profile}.txt"]
        assert product[:2] == ["--no-deps", "--no-build-isolation"]


def test_build_stage_copies_every_package_the_product_installs() -> None:
    packages = {"settings", "models", "store", "indexer", "service", "medsearch"}
    assert packages <= set(build_stage_files())


def test_api_image_install_serves_without_torch(tmp_path: Path, tiny_bert: Path, tiny_onnx: Path) -> None:
    venv = image_like_venv(tmp_path, "api")
    probe = subprocess.run(
        [venv / "bin" / "python", "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "True", "the api install pulled in torch"
    home = served_home(
        tmp_path / "data", [{"id": "a", "text": "高血压病人可以口服党参"}], tiny_bert, tiny_onnx
    )
    port = free_port()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "MEDSEARCH_HOME": str(home),
        "MEDSEARCH_QUERY_MODEL": "query",
        "MEDSEARCH_PORT": str(port),
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [venv / "bin" / "medsearch", "serve"], env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_ready(f"http://127.0.0.1:{port}", server, 60, log)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/search", json={"query": "党参", "top_k": 1})
        assert answer.status_code == 200 and answer.json()["hits"][0]["id"] == "a"
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0


def test_indexer_image_install_indexes(tmp_path: Path, tiny_bert: Path) -> None:
    venv = image_like_venv(tmp_path, "indexer")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "感冒发烧多喝水"}, ensure_ascii=False) + "\n")
    env = {**os.environ, "PATH": f"{venv / 'bin'}:/usr/bin:/bin", "MEDSEARCH_HOME": str(tmp_path / "data")}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [venv / "bin" / "medsearch", "index", str(corpus), "--model", str(tiny_bert)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert (report["switched"], report["indexed"]) == (True, 1)
