"""The dependency lock: ``requirements/<profile>.txt``, one per install profile (issue 23).

Every install the project makes (``make demo``/``make test``, CI, both Docker stages) installs one of
these files with ``pip install --require-hashes --no-deps``: the same versions and the same bytes
whatever PyPI released since. The files are made by uv's ``uv pip compile --generate-hashes`` (the
lock tool is itself pinned and hash-checked in ``requirements/uv.txt``) and refreshed only on purpose
(``make lock``, ``make upgrade``).

Why uv and not pip-tools: ``uv pip compile`` resolves for a stated target (CPython 3.11 on Linux
x86-64, the images' platform) wherever it runs, in seconds instead of minutes, and writes the same
hashed requirements format pip installs, so neither the images nor the Makefile need uv to install.

Profiles: ``service`` (the base dependencies: the api image), ``indexer`` (the ``index`` extra: the
indexer image), ``dev`` (``index,dev``: the development venv, CI). ``dev`` is resolved first and the
two image profiles are resolved under its pins, so a version is the same in every profile and what
the tests run is what the images ship. Each profile also locks the project's build requirements
(``[build-system] requires``), since the project itself is built without build isolation.

Staleness: each file's header records a digest of the inputs it was made from (the dependency
tables of ``pyproject.toml`` and ``requirements/torch-cpu.txt``). ``check`` recomputes it and fails
in one line naming the command to run, before anything is installed.

This module uses the standard library only: it runs before the virtual environment exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOCK_DIR = "requirements"
# The CPU build of torch, pinned to the exact file (an open range pulls gigabytes of CUDA).
TORCH_CONSTRAINT = "torch-cpu.txt"
PYTHON = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
REFRESH = "make lock"


@dataclass(frozen=True)
class Profile:
    name: str
    extras: tuple[str, ...]
    installs: str


PROFILES = (
    Profile("dev", ("index", "dev"), "make demo, make test, .ci/run"),
    Profile("indexer", ("index",), "the Dockerfile's indexer image"),
    Profile("service", (), "the Dockerfile's api image"),
)

_DIGEST = re.compile(r"^# inputs-sha256: ([0-9a-f]{64})$", re.MULTILINE)
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", re.MULTILINE)


class LockError(Exception):
    """A lock file is missing, stale or unreadable; the message names the file and the fix."""


def lock_path(profile: str, root: Path = ROOT) -> Path:
    return root / LOCK_DIR / f"{profile}.txt"


def canonical(name: str) -> str:
    """PEP 503 normalized name, as pip and PyPI compare names."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject(root: Path) -> dict[str, Any]:
    return tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))


def inputs_digest(pyproject: dict[str, Any], root: Path = ROOT) -> str:
    """The digest of what a lock is resolved from: pyproject's dependency tables (not the rest of the
    file, so a linter setting does not stale the lock) and the torch constraint."""
    project = pyproject.get("project", {})
    inputs = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "build-system": pyproject.get("build-system", {}).get("requires", []),
        "torch": (root / LOCK_DIR / TORCH_CONSTRAINT).read_text(encoding="utf-8"),
        "target": [PYTHON, PLATFORM],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def read_pins(path: Path) -> dict[str, str]:
    """Canonical name -> version of every ``name==version`` line of a lock file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise LockError(f"{path}: cannot read the lock ({e.strerror}): run `{REFRESH}`") from e
    return {canonical(name): version for name, version in _PIN.findall(text)}


def check(root: Path = ROOT) -> str | None:
    """None when every lock file was made from today's inputs for this Python; else one line that names
    what is wrong and the command that fixes it."""
    here = ".".join(map(str, sys.version_info[:2]))
    if here != PYTHON:
        return f"the lock is for CPython {PYTHON}, this is {here}: run with PYTHON=python{PYTHON}"
    digest = inputs_digest(_pyproject(root), root)
    stale = []
    for profile in PROFILES:
        path = lock_path(profile.name, root)
        found = _DIGEST.search(path.read_text(encoding="utf-8")) if path.exists() else None
        if found is None or found.group(1) != digest:
            stale.append(str(path.relative_to(root)))
    if stale:
        return f"{', '.join(stale)} not made from this pyproject.toml: run `{REFRESH}` and commit the result"
    return None


def _header(profile: Profile, digest: str) -> str:
    extras = f"extras: {', '.join(profile.extras)}" if profile.extras else "base dependencies"
    return (
        f"# Lock of the {profile.name!r} profile ({extras}) for CPython {PYTHON} on Linux x86-64.\n"
        f"# Installed by {profile.installs} with pip --require-hashes --no-deps.\n"
        f"# Made by `{REFRESH}` (security/lock.py: uv pip compile --generate-hashes); never edit by hand.\n"
        f"# inputs-sha256: {digest}\n"
    )


def _compile(uv: str, root: Path, profile: Profile, build_in: Path, pins: Path, upgrade: bool) -> str:
    out = lock_path(profile.name, root)
    command = [
        uv, "pip", "compile", "pyproject.toml", str(build_in),
        *(arg for extra in profile.extras for arg in ("--extra", extra)),
        "--generate-hashes", "--no-header", "--quiet",
        "--python-version", PYTHON, "--python-platform", PLATFORM,
        "--constraint", f"{LOCK_DIR}/{TORCH_CONSTRAINT}",
        "--output-file", str(out),
    ]  # fmt: skip
    # Without --upgrade, the pins already in the output file are preferences: uv keeps what still
    # satisfies the inputs.
    if profile.name == "dev":
        command += ["--upgrade"] if upgrade else []
    else:
        # The image profiles take dev's versions, so what the tests run is what the images ship.
        command += ["--constraint", str(pins)]
    # The local wheel store, where the CPU torch lies on this kind of machine, as pip's config has it.
    links = os.environ.get("PIP_FIND_LINKS", "/opt/wheels")
    command += [arg for link in links.split() if Path(link).is_dir() for arg in ("--find-links", link)]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise LockError(f"uv could not lock the {profile.name!r} profile:\n{done.stderr.strip()}")
    return out.read_text(encoding="utf-8")


def refresh(uv: str, root: Path = ROOT, upgrade: bool = False) -> str:
    """Re-resolve every profile; returns what changed, one line per package."""
    dev = lock_path("dev", root)
    before = read_pins(dev) if dev.exists() else {}
    pyproject = _pyproject(root)
    digest = inputs_digest(pyproject, root)
    build = pyproject["build-system"]["requires"]
    with tempfile.TemporaryDirectory() as scratch:
        build_in = Path(scratch) / "build.in"
        build_in.write_text("\n".join(build) + "\n", encoding="utf-8")
        pins = Path(scratch) / "dev-pins.txt"
        for profile in PROFILES:  # dev first: the image profiles are constrained to its pins
            body = _compile(uv, root, profile, build_in, pins, upgrade)
            body = body.replace(str(pins), f"{LOCK_DIR}/dev.txt").replace(str(build_in), "build-system")
            lock_path(profile.name, root).write_text(_header(profile, digest) + body, encoding="utf-8")
            if profile.name == "dev":
                locked = read_pins(dev)
                pins.write_text("".join(f"{n}=={v}\n" for n, v in locked.items()), encoding="utf-8")
    return changes(before, read_pins(dev))


def changes(before: dict[str, str], after: dict[str, str]) -> str:
    lines = []
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        lines.append(f"  {name}: {old or '(new)'} -> {new or '(removed)'}")
    return "\n".join(lines) if lines else "  no version changed"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m security.lock", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the project (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="fail in one line when a lock was made from other inputs")
    made = commands.add_parser("refresh", help="re-resolve every profile and print what changed")
    made.add_argument("--uv", default="uv", help="the uv executable (default: %(default)s)")
    made.add_argument("--upgrade", action="store_true", help="move every package to its newest release")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            problem = check(args.root)
            if problem:
                print(f"error: {problem}", file=sys.stderr)
            return 1 if problem else 0
        print("lock refreshed; versions changed (dev profile, a superset of the others):")
        print(refresh(args.uv, args.root, upgrade=args.upgrade))
    except LockError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
