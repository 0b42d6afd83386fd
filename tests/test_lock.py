"""The dependency lock (security/lock.py): fresh, consistent across profiles, what this venv holds, and
refused in one line when pyproject.toml changed without `make lock`."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from security.lock import LOCK_DIR, PROFILES, canonical, changes, check, lock_path, read_pins, refresh
from tests.conftest import REPO

PINS = {p.name: read_pins(lock_path(p.name)) for p in PROFILES}


def test_the_committed_lock_is_made_from_the_committed_pyproject() -> None:
    assert check(REPO) is None


def test_profiles_agree_and_nest_service_indexer_dev() -> None:
    service, indexer, dev = PINS["service"], PINS["indexer"], PINS["dev"]
    # Same version everywhere: what the tests run is what the images ship.
    assert service.items() <= indexer.items() <= dev.items()
    assert {"torch", "transformers"}.isdisjoint(service)
    assert indexer["torch"] == dev["torch"] == "2.13.0+cpu"
    assert {"pytest", "ruff", "mypy", "pytest-socket"} <= dev.keys()
    assert {"pytest", "ruff", "mypy"}.isdisjoint(indexer)
    # The project is built without isolation, so its build backend is locked in every profile.
    assert all("setuptools" in pins for pins in PINS.values())


@pytest.mark.parametrize("profile", [p.name for p in PROFILES])
def test_every_pin_carries_hashes(profile: str) -> None:
    pinned: list[str] = []  # each pin with its continuation lines
    for line in lock_path(profile).read_text(encoding="utf-8").splitlines():
        if re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*==", line):
            pinned.append(line)
        elif line.startswith("    --hash=") and pinned:
            pinned[-1] += line
    assert len(pinned) == len(PINS[profile])
    assert all("--hash=sha256:" in e for e in pinned), [e.split()[0] for e in pinned if "--hash" not in e]
    # The CPU torch is one exact file: the lock admits no CUDA build.
    if "torch" in PINS[profile]:
        [torch] = [e for e in pinned if e.startswith("torch==")]
        assert torch.count("--hash=") == 1


def test_this_venv_holds_exactly_the_dev_lock() -> None:
    """`make test` runs in the venv `make` built from requirements/dev.txt: nothing more, nothing less
    (pip and the project itself aside), each at the locked version."""
    installed = {
        canonical(d.metadata["Name"]): d.version
        for d in importlib.metadata.distributions(path=[p for p in sys.path if p.endswith("site-packages")])
    }
    installed.pop("pip", None)
    installed.pop("medsearch", None)
    assert installed == PINS["dev"]


def _project_copy(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(REPO / LOCK_DIR, tmp_path / LOCK_DIR)
    return tmp_path


def test_a_changed_dependency_fails_the_check_in_one_line_naming_the_command(tmp_path: Path) -> None:
    root = _project_copy(tmp_path)
    pyproject = root / "pyproject.toml"
    # Settings that do not shape the lock leave it fresh...
    pyproject.write_text(pyproject.read_text().replace("line-length = 110", "line-length = 100"))
    assert check(root) is None
    # ... a dependency does not.
    pyproject.write_text(pyproject.read_text().replace('"httpx>=0.27"', '"httpx>=0.28"'))
    done = subprocess.run(
        [sys.executable, "-m", "security.lock", "--root", str(root), "check"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert "requirements/dev.txt" in line and "pyproject.toml" in line and "run `make lock`" in line


def test_a_changed_torch_constraint_or_a_missing_lock_fails_the_check(tmp_path: Path) -> None:
    root = _project_copy(tmp_path)
    constraint = root / LOCK_DIR / "torch-cpu.txt"
    constraint.write_text(constraint.read_text().replace("2.13.0+cpu", "2.14.1+cpu"))
    assert "run `make lock`" in (check(root) or "")
    constraint.write_text((REPO / LOCK_DIR / "torch-cpu.txt").read_text())
    (root / LOCK_DIR / "service.txt").unlink()
    assert (check(root) or "").startswith("requirements/service.txt not made from this pyproject.toml")


FAKE_UV = """\
    #!{python}
    # Stands in for uv: records its arguments and writes a lock of every requirement it was given.
    import json, pathlib, sys
    args = sys.argv[1:]
    log = pathlib.Path({log!r})
    log.write_text(log.read_text() + json.dumps(args) + "\\n" if log.exists() else json.dumps(args) + "\\n")
    out = pathlib.Path(args[args.index("--output-file") + 1])
    extras = [args[i + 1] for i, a in enumerate(args) if a == "--extra"]
    pins = {{"fastapi": "0.200.0", "setuptools": "80.0.0"}}
    if "index" in extras:
        pins["torch"] = "2.13.0+cpu"
    if "dev" in extras:
        pins["pytest"] = "9.9.9"
    if "--constraint" in args and any("dev-pins" in a for a in args):
        source = pathlib.Path([a for a in args if "dev-pins" in a][0]).read_text()
        assert "pytest==9.9.9" in source, source
    out.write_text("".join(f"{{n}}=={{v}} \\\\\\n    --hash=sha256:{{'0' * 64}}\\n" for n, v in pins.items()))
"""


def test_refresh_locks_dev_first_constrains_the_images_to_it_and_reports_changes(tmp_path: Path) -> None:
    root = _project_copy(tmp_path / "project")
    uv, log = tmp_path / "uv", tmp_path / "uv.log"
    uv.write_text(textwrap.dedent(FAKE_UV).format(python=sys.executable, log=str(log)))
    uv.chmod(0o755)
    report = refresh(str(uv), root)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[c.index("--output-file") + 1].rsplit("/", 1)[-1] for c in calls] == [
        "dev.txt",
        "indexer.txt",
        "service.txt",
    ]
    assert all("--generate-hashes" in c and c[c.index("--python-version") + 1] == "3.11" for c in calls)
    # The images are resolved under dev's pins; dev itself under none but torch's.
    assert sum("dev-pins" in arg for arg in calls[0]) == 0
    assert all(any("dev-pins" in arg for arg in c) for c in calls[1:])
    assert check(root) is None, "a refreshed lock is fresh"
    assert read_pins(lock_path("service", root)) == {"fastapi": "0.200.0", "setuptools": "80.0.0"}
    assert "  fastapi: " in report and "-> 0.200.0" in report and "pytest: " in report


def test_changes_lists_added_removed_and_moved_packages() -> None:
    assert changes({"a": "1", "b": "1", "c": "1"}, {"a": "1", "b": "2", "d": "1"}).splitlines() == [
        "  b: 1 -> 2",
        "  c: 1 -> (removed)",
        "  d: (new) -> 1",
    ]
    assert changes({"a": "1"}, {"a": "1"}) == "  no version changed"
