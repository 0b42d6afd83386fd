"""Dependency audit of what the images ship, the lock, against PyPI's vulnerability data (issues 17, 23).

What is audited: ``requirements/indexer.txt``, the lock of the indexer image, which holds every
version the api image's lock (``requirements/service.txt``) holds (security/lock.py makes them agree).
The live environment is never read: the audit's verdict depends on what we ship, not on what pip
picked for whoever runs it. Dev and test tools (pytest, ruff, mypy, ...) never ship and are out of
scope.

Why this exists instead of pip-audit: pip-audit asks PyPI's per-version JSON API
(``/pypi/<name>/<version>/json``) or OSV (api.osv.dev) which vulnerabilities affect each version.
Where this project is built and tested, only the package registries are reachable and the
per-version API answers 404, so pip-audit audits nothing there. The project JSON
(``/pypi/<name>/json``) does answer; its ``vulnerabilities`` apply to the latest release only. So:

- each locked version is asked at the per-version endpoint first (exact; a machine with full PyPI
  access gets exact answers for every dependency, and nothing here needs to change);
- on 404/403 the project endpoint answers, which is exact when the locked version is the latest
  release (a local version such as ``2.13.0+cpu`` compares by its public version ``2.13.0``);
- a locked version behind its latest release with only the project endpoint answering is
  UNAUDITED here: a line in the report that names it, never a failure. Being behind is not a
  finding, and a new upstream release must not turn CI red; run pip-audit where the per-version
  API is reachable to audit those exactly::

    pip-audit --disable-pip --no-deps -r <(python -m security.audit --requirements) --ignore-vuln ID

Policy lives in ``security/audit-allowlist.toml`` (its header documents the rules): a known
vulnerability in a locked version fails unless allow-listed, an expired allow-list entry fails, an
entry that no longer matches anything is a warning.

Exit status: 0 clean, 1 findings, 2 the audit could not run (PyPI unreachable, bad allow-list or lock).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ErrorDetails

from security.lock import LockError, lock_path, read_pins

PYPI = "https://pypi.org/pypi"
ALLOWLIST = Path(__file__).with_name("audit-allowlist.toml")

# A URL to its decoded JSON, or None for "no such resource": a 404, or a 403 from a proxy that blocks
# the path; both send the audit to the next endpoint.
Fetch = Callable[[str], dict[str, Any] | None]

# version: the per-version endpoint answered (exact); latest: the locked version is the latest release
# and the project endpoint answered (exact); behind: the locked version is older than the latest and
# only the project endpoint answered (unaudited); missing: PyPI has no such project (unaudited).
Coverage = Literal["version", "latest", "behind", "missing"]


class AuditError(Exception):
    """The audit could not run: PyPI unreachable, a bad allow-list, an unreadable lock."""


# --- what the images ship --------------------------------------------------------------------------


def locked_closure(profile: str = "indexer") -> dict[str, str]:
    """Canonical name -> locked version of every distribution in a profile's lock, sorted by name."""
    try:
        pins = read_pins(lock_path(profile))
    except LockError as e:
        raise AuditError(str(e)) from e
    if not pins:
        raise AuditError(f"{lock_path(profile)}: no pinned versions in the lock")
    return dict(sorted(pins.items()))


# --- what PyPI knows --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vulnerability:
    id: str
    aliases: tuple[str, ...] = ()
    fixed_in: tuple[str, ...] = ()
    summary: str = ""
    link: str = ""

    @property
    def ids(self) -> frozenset[str]:
        return frozenset((self.id, *self.aliases))


@dataclass(frozen=True)
class DependencyReport:
    name: str
    version: str
    coverage: Coverage
    latest: str | None = None
    vulnerabilities: tuple[Vulnerability, ...] = ()

    @property
    def audited(self) -> bool:
        return self.coverage in ("version", "latest")


def parse_vulnerabilities(raw: Iterable[dict[str, Any]] | None) -> tuple[Vulnerability, ...]:
    """PyPI's ``vulnerabilities`` list; withdrawn entries (retracted advisories) are dropped."""
    found = []
    for entry in raw or []:
        if entry.get("withdrawn"):
            continue
        text = entry.get("summary") or entry.get("details") or ""
        found.append(
            Vulnerability(
                id=str(entry["id"]),
                aliases=tuple(entry.get("aliases") or ()),
                fixed_in=tuple(entry.get("fixed_in") or ()),
                summary=" ".join(str(text).split()),
                link=str(entry.get("link") or ""),
            )
        )
    return tuple(found)


def _public(version: str) -> Version | None:
    try:
        return Version(Version(version).public)
    except InvalidVersion:
        return None


def audit_dependency(name: str, version: str, fetch: Fetch) -> DependencyReport:
    public = _public(version)
    # PyPI never holds local versions (2.13.0+cpu): ask for the public part, as written (PyPI's URLs
    # take the version string as uploaded, not a normalized one).
    exact = fetch(f"{PYPI}/{name}/{version.split('+')[0]}/json")
    if exact is not None:
        return DependencyReport(
            name, version, "version", None, parse_vulnerabilities(exact.get("vulnerabilities"))
        )
    project = fetch(f"{PYPI}/{name}/json")
    if project is None:
        return DependencyReport(name, version, "missing")
    latest = str(project["info"]["version"])
    if public is not None and public == _public(latest):
        return DependencyReport(
            name, version, "latest", latest, parse_vulnerabilities(project.get("vulnerabilities"))
        )
    # The project's vulnerabilities are the latest release's, which say nothing about this version.
    return DependencyReport(name, version, "behind", latest)


def audit_closure(closure: dict[str, str], fetch: Fetch, workers: int = 8) -> list[DependencyReport]:
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        reports = list(pool.map(lambda item: audit_dependency(item[0], item[1], fetch), closure.items()))
    finally:
        # An unreachable PyPI stops the audit at the first error, not after every request has timed out.
        pool.shutdown(cancel_futures=True)
    if reports and all(r.coverage == "missing" for r in reports):
        # Every project 404/403 is a blocked PyPI, not dozens of unpublished packages.
        raise AuditError(f"PyPI answered 404/403 for all {len(reports)} dependencies: cannot audit here")
    return reports


def pypi_fetch(
    url: str, *, timeout: float = 20.0, attempts: int = 3, backoff: float = 1.0
) -> dict[str, Any] | None:
    """GET ``url`` as JSON; None on 404/403. Connection errors, timeouts, 429 and 5xx are retried."""
    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": "medsearch-audit"}
    )
    problem: Exception | None = None
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                data = json.load(response)
            if not isinstance(data, dict):
                raise AuditError(f"{url}: not a JSON object")
            return data
        except urllib.error.HTTPError as e:
            if e.code in (403, 404):
                return None
            if e.code != 429 and e.code < 500:
                raise AuditError(f"{url}: HTTP {e.code}") from e
            problem = e
        except (OSError, http.client.HTTPException, ValueError) as e:  # ValueError: a truncated body
            problem = e
        if attempt + 1 < attempts:
            time.sleep(backoff * 2**attempt)
    raise AuditError(f"cannot reach PyPI ({url}): {problem}")


# --- the allow-list ---------------------------------------------------------------------------------


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    package: str = Field(min_length=1)
    reason: str = Field(min_length=1)

    @field_validator("package")
    @classmethod
    def _canonical(cls, value: str) -> str:
        return canonicalize_name(value)


class VulnerabilityEntry(_Entry):
    id: str = Field(min_length=1)
    expires: date


class AllowList(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    vulnerability: list[VulnerabilityEntry] = []


def load_allowlist(path: Path = ALLOWLIST) -> AllowList:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise AuditError(f"{path}: cannot read the allow-list: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise AuditError(f"{path}: not valid TOML: {e}") from e
    try:
        return AllowList.model_validate(data)
    except ValidationError as e:
        raise AuditError(
            f"{path}: invalid allow-list:\n" + "\n".join(_describe(err, data) for err in e.errors())
        ) from e


def _describe(error: ErrorDetails, data: dict[str, Any]) -> str:
    loc = error["loc"]
    where = ".".join(str(part) for part in loc) or "file"
    if len(loc) >= 2 and isinstance(loc[1], int):
        table, index = str(loc[0]), loc[1]
        entry = data.get(table, [])[index]
        named = ", ".join(
            f"{k} = {entry[k]!r}" for k in ("id", "package") if isinstance(entry, dict) and k in entry
        )
        field_name = ".".join(str(part) for part in loc[2:]) or "entry"
        where = f"[[{table}]] entry {index + 1}" + (f" ({named})" if named else "") + f", {field_name}"
    return f"  {where}: {error['msg']}"


# --- the verdict ------------------------------------------------------------------------------------


@dataclass
class Verdict:
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def evaluate(reports: Sequence[DependencyReport], allowlist: AllowList, today: date) -> Verdict:
    verdict = Verdict()
    used: set[VulnerabilityEntry] = set()
    # An unaudited version (behind the latest release, or not on PyPI) is a row of the report, not a
    # failure: only a known vulnerability is a finding.
    for report in reports:
        where = f"{report.name} {report.version}"
        for vuln in report.vulnerabilities:
            matches = [e for e in allowlist.vulnerability if e.package == report.name and e.id in vuln.ids]
            used.update(matches)
            label = f"{where}: {vuln.id}" + (f" ({', '.join(vuln.aliases)})" if vuln.aliases else "")
            if not matches:
                fixed = f", fixed in {', '.join(vuln.fixed_in)}" if vuln.fixed_in else ""
                verdict.failures.append(f"{label} not allow-listed{fixed}: {vuln.summary}")
            elif all(e.expires < today for e in matches):
                verdict.failures.append(
                    f"{label} allow-listed until {max(e.expires for e in matches)}: expired"
                )
            else:
                verdict.accepted.append(f"{label} allow-listed until {max(e.expires for e in matches)}")
    for entry in allowlist.vulnerability:
        if entry not in used and entry.expires < today:
            verdict.failures.append(f"[[vulnerability]] {entry.id} ({entry.package}) expired {entry.expires}")
        elif entry not in used:
            verdict.warnings.append(
                f"[[vulnerability]] {entry.id} ({entry.package}) matches nothing: remove it"
            )
    return verdict


# --- the command ------------------------------------------------------------------------------------


def render(
    reports: Sequence[DependencyReport], verdict: Verdict, today: date, everything: bool = False
) -> str:
    rows = [("package", "locked", "latest", "coverage", "vulnerabilities")]
    for r in reports:
        if everything or not r.audited or r.vulnerabilities:
            vulns = ", ".join(v.id for v in r.vulnerabilities) or "-"
            rows.append((r.name, r.version, r.latest or "-", _COVERAGE[r.coverage], vulns))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines += [f"accepted: {line}" for line in verdict.accepted]
    lines += [f"warning: {line}" for line in verdict.warnings]
    lines += [f"FAIL: {line}" for line in verdict.failures]
    lines.append(summary(reports, verdict, today))
    return "\n".join(lines)


_COVERAGE: dict[str, str] = {
    "version": "exact (per-version)",
    "latest": "exact (is latest)",
    "behind": "unaudited here (behind latest; per-version API unreachable)",
    "missing": "unaudited (not on PyPI)",
}


def summary(reports: Sequence[DependencyReport], verdict: Verdict, today: date) -> str:
    per_version = sum(r.coverage == "version" for r in reports)
    at_latest = sum(r.coverage == "latest" for r in reports)
    exact = per_version + at_latest
    vulns = sum(len(r.vulnerabilities) for r in reports)
    return (
        f"audit {today.isoformat()}: {len(reports)} locked runtime dependencies, {exact} audited exactly "
        f"({per_version} per-version, {at_latest} at latest), {len(reports) - exact} unaudited; "
        f"{vulns} vulnerabilities; {len(verdict.failures)} failures, {len(verdict.warnings)} warnings: "
        f"{'PASS' if verdict.passed else 'FAIL'}"
    )


def requirements(closure: dict[str, str]) -> str:
    """The locked closure as pins pip-audit reads; a local version is pinned by its public one (PyPI's)."""
    lines = []
    for name, version in closure.items():
        public = _public(version)
        pin = f"{name}=={public or version}"
        lines.append(pin if public is None or str(public) == version else f"{pin}  # locked {version}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m security.audit", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--allowlist", type=Path, default=ALLOWLIST, help="allow-list TOML (default: %(default)s)"
    )
    parser.add_argument("--all", action="store_true", help="list every dependency, not only those to look at")
    parser.add_argument(
        "--requirements",
        action="store_true",
        help="print the locked runtime closure as name==version lines and exit",
    )
    args = parser.parse_args(argv)
    today = date.today()
    try:
        closure = locked_closure()
        if args.requirements:
            print(requirements(closure))
            return 0
        allowlist = load_allowlist(args.allowlist)
        reports = audit_closure(closure, pypi_fetch)
    except AuditError as e:
        print(f"audit could not run: {e}", file=sys.stderr)
        return 2
    verdict = evaluate(reports, allowlist, today)
    print(render(reports, verdict, today, everything=args.all))
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
