"""What a result was measured on: date, git commit and the machine (CPU, cores, RAM, runtimes)."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel

RUNTIME_PACKAGES = (
    "onnxruntime",
    "torch",
    "transformers",
    "numpy",
    "tokenizers",
    "uvicorn",
    "httpx",
    "qdrant-edge-py",
)
# CPU features the figures depend on (SIMD width of Qdrant's distance kernels, int8 and bf16 matmul):
# machines differ by session, so every report names the ones present.
CPU_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
)


class MachineInfo(BaseModel):
    cpu_model: str
    cpu_flags: list[str] = []
    cores_logical: int
    cores_usable: int
    ram_gib: float | None
    python: str
    platform: str
    packages: dict[str, str | None]


def process_status_kib(pid: int | str, keys: tuple[str, ...]) -> dict[str, int] | None:
    """The ``keys`` of /proc/PID/status (``pid`` "self" for this process) in KiB, those present; None
    when the process or /proc is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    except OSError:
        return None
    found = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            found[key] = int(value.split()[0])
    return found


def process_cpu_s(pid: int | str) -> float | None:
    """CPU seconds (user + system, every thread) ``pid`` has used so far, from /proc/PID/stat; None
    when the process or /proc is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may hold spaces: utime and stime
    # are the 14th and 15th fields of the line, the 12th and 13th after the name.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Those of ``CPU_FLAGS`` the CPU has (x86 "flags", Arm "Features" of /proc/cpuinfo)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return []
    for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            present = set(value.split())
            return [flag for flag in CPU_FLAGS if flag in present]
    return []


def _ram_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text(encoding="utf-8").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / (1024 * 1024), 1)
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> MachineInfo:
    """Read without importing the runtimes (their versions come from the installed metadata)."""
    logical = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    return MachineInfo(
        cpu_model=cpu_model(),
        cpu_flags=cpu_flags(),
        cores_logical=logical,
        cores_usable=usable,
        ram_gib=_ram_gib(),
        python=platform.python_version(),
        platform=platform.platform(),
        packages={name: _version(name) for name in RUNTIME_PACKAGES},
    )


def git_commit(cwd: Path | None = None) -> str:
    """Short commit of the working tree, ``-dirty`` when it has uncommitted changes; ``unknown``
    outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if status.strip() else head
