"""The dependency audit (security/audit.py): its rules on a fake PyPI, the committed lock on a fake PyPI
(today's and tomorrow's), and the real audit of the lock against PyPI."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import pytest

from security.audit import (
    ALLOWLIST,
    PYPI,
    AllowList,
    AuditError,
    VulnerabilityEntry,
    audit_closure,
    evaluate,
    load_allowlist,
    locked_closure,
    main,
    pypi_fetch,
    render,
    requirements,
)
from security.lock import lock_path, read_pins

TODAY = date(2026, 12, 1)
CVE = {
    "id": "GHSA-aaaa-bbbb-cccc",
    "aliases": ["CVE-2026-0001", "PYSEC-2026-1"],
    "fixed_in": ["2.0.1"],
    "summary": "Request smuggling",
    "link": "https://osv.dev/vulnerability/GHSA-aaaa-bbbb-cccc",
    "withdrawn": None,
}


class FakePyPI:
    """URL -> JSON; anything else is a 404, as PyPI's per-version endpoint answers here."""

    def __init__(self) -> None:
        self.answers: dict[str, dict[str, Any]] = {}

    def project(self, name: str, latest: str, vulns: list[dict[str, Any]] | None = None) -> FakePyPI:
        self.answers[f"{PYPI}/{name}/json"] = {"info": {"version": latest}, "vulnerabilities": vulns or []}
        return self

    def release(self, name: str, version: str, vulns: list[dict[str, Any]] | None = None) -> FakePyPI:
        self.answers[f"{PYPI}/{name}/{version}/json"] = {
            "info": {"version": version},
            "vulnerabilities": vulns or [],
        }
        return self

    def __call__(self, url: str) -> dict[str, Any] | None:
        return self.answers.get(url)


def _verdict(closure: dict[str, str], pypi: FakePyPI, allowlist: AllowList | None = None) -> Any:
    return evaluate(audit_closure(closure, pypi), allowlist or AllowList(), TODAY)


def _accept(id: str, expires: date = date(2027, 3, 1), package: str = "web") -> AllowList:
    return AllowList(
        vulnerability=[VulnerabilityEntry(id=id, package=package, reason="test", expires=expires)]
    )


def test_a_vulnerability_found_fails() -> None:
    verdict = _verdict({"web": "2.0.0"}, FakePyPI().project("web", "2.0.0", [CVE]))
    assert not verdict.passed
    assert "GHSA-aaaa-bbbb-cccc" in verdict.failures[0] and "fixed in 2.0.1" in verdict.failures[0]


@pytest.mark.parametrize("listed", ["GHSA-aaaa-bbbb-cccc", "CVE-2026-0001"])
def test_an_allow_listed_vulnerability_passes_by_id_or_alias(listed: str) -> None:
    verdict = _verdict({"web": "2.0.0"}, FakePyPI().project("web", "2.0.0", [CVE]), _accept(listed))
    assert verdict.passed and verdict.warnings == []
    assert len(verdict.accepted) == 1


def test_an_entry_for_another_package_does_not_cover_a_finding() -> None:
    pypi = FakePyPI().project("web", "2.0.0", [CVE])
    assert not _verdict({"web": "2.0.0"}, pypi, _accept("CVE-2026-0001", package="other")).passed


def test_an_expired_entry_fails() -> None:
    pypi = FakePyPI().project("web", "2.0.0", [CVE])
    verdict = _verdict({"web": "2.0.0"}, pypi, _accept("CVE-2026-0001", expires=date(2026, 11, 30)))
    assert not verdict.passed and "expired" in verdict.failures[0]
    # Expired and matching nothing fails too: the entry is due for review either way.
    assert not _verdict(
        {"web": "2.0.0"}, FakePyPI().project("web", "2.0.0"), _accept("X", date(2026, 1, 1))
    ).passed


def test_a_stale_entry_is_a_warning_not_a_failure() -> None:
    allowlist = AllowList(
        vulnerability=[VulnerabilityEntry(id="GONE-1", package="web", reason="r", expires=date(2027, 1, 1))],
    )
    verdict = _verdict({"web": "2.0.0"}, FakePyPI().project("web", "2.0.0"), allowlist)
    assert verdict.passed
    assert len(verdict.warnings) == 1 and "GONE-1" in verdict.warnings[0]


def test_withdrawn_vulnerabilities_are_ignored() -> None:
    withdrawn = {**CVE, "withdrawn": "2026-05-01T00:00:00Z"}
    verdict = _verdict({"web": "2.0.0"}, FakePyPI().project("web", "2.0.0", [withdrawn]))
    assert verdict.passed and verdict.accepted == []


def test_a_dependency_behind_latest_is_reported_unaudited_and_passes() -> None:
    # The latest release's vulnerability says nothing about 1.9.0: not a finding, and no failure either.
    pypi = FakePyPI().project("web", "2.0.0", [CVE])
    [report] = audit_closure({"web": "1.9.0"}, pypi)
    assert (report.coverage, report.latest, report.vulnerabilities) == ("behind", "2.0.0", ())
    verdict = evaluate([report], AllowList(), TODAY)
    assert verdict.passed and verdict.failures == []
    # ... but the report names it, with the release it is behind.
    row = next(line for line in render([report], verdict, TODAY).splitlines() if line.startswith("web "))
    assert "1.9.0" in row and "2.0.0" in row and "unaudited" in row


def test_the_per_version_answer_is_preferred_over_the_project_answer() -> None:
    # An old version with its own answer is audited exactly; the latest release's data is not used.
    pypi = FakePyPI().project("web", "2.0.0", []).release("web", "1.9.0", [CVE])
    [report] = audit_closure({"web": "1.9.0"}, pypi)
    assert report.coverage == "version" and [v.id for v in report.vulnerabilities] == [CVE["id"]]
    pypi = FakePyPI().project("web", "2.0.0", [CVE]).release("web", "2.0.0", [])
    assert audit_closure({"web": "2.0.0"}, pypi)[0].vulnerabilities == ()


def test_a_local_version_compares_by_its_public_version() -> None:
    [report] = audit_closure({"torch": "2.13.0+cpu"}, FakePyPI().project("torch", "2.13.0", [CVE]))
    assert report.coverage == "latest" and len(report.vulnerabilities) == 1
    [report] = audit_closure({"torch": "2.13.0+cpu"}, FakePyPI().release("torch", "2.13.0"))
    assert report.coverage == "version"
    assert requirements({"torch": "2.13.0+cpu"}) == "torch==2.13.0  # locked 2.13.0+cpu"


def test_a_project_pypi_does_not_know_is_unaudited_and_a_blocked_pypi_is_an_error() -> None:
    reports = audit_closure({"web": "2.0.0", "private": "1.0"}, FakePyPI().project("web", "2.0.0"))
    assert {r.name: r.coverage for r in reports} == {"web": "latest", "private": "missing"}
    with pytest.raises(AuditError, match="404/403 for all"):
        audit_closure({"web": "2.0.0"}, FakePyPI())


def test_the_audited_closure_is_the_lock_the_images_ship() -> None:
    closure = locked_closure()
    assert closure == dict(sorted(read_pins(lock_path("indexer")).items()))
    assert {"fastapi", "uvicorn", "onnxruntime", "qdrant-client", "torch", "transformers"} <= closure.keys()
    assert closure["torch"] == "2.13.0+cpu"
    assert {"medsearch", "pytest", "ruff", "mypy", "schemathesis", "matplotlib"}.isdisjoint(closure)
    # The api image's lock is inside it, version for version (the audit covers both images).
    service = read_pins(lock_path("service"))
    assert service.items() <= closure.items() and {"torch", "transformers"}.isdisjoint(service)


def _pypi_for_the_lock(bump: bool) -> FakePyPI:
    """PyPI as this machine sees it for the committed lock: project endpoints only, whose latest
    release is the locked version (today) or a newer one (tomorrow: every dependency released)."""
    pypi = FakePyPI()
    for name, version in locked_closure().items():
        public = version.split("+")[0]
        pypi.project(name, f"{public}.post99" if bump else public)
    return pypi


@pytest.mark.parametrize("tomorrow", [False, True], ids=["today", "after-new-releases"])
def test_the_lock_passes_today_and_after_every_dependency_releases(tomorrow: bool) -> None:
    reports = audit_closure(locked_closure(), _pypi_for_the_lock(bump=tomorrow))
    verdict = evaluate(reports, load_allowlist(ALLOWLIST), TODAY)
    assert verdict.passed, verdict.failures
    assert {r.coverage for r in reports} == ({"behind"} if tomorrow else {"latest"})


def test_a_fake_advisory_against_a_locked_version_fails() -> None:
    closure = locked_closure()
    pypi = _pypi_for_the_lock(bump=True).release("fastapi", closure["fastapi"], [CVE])
    verdict = evaluate(audit_closure(closure, pypi), load_allowlist(ALLOWLIST), TODAY)
    assert not verdict.passed
    assert verdict.failures == [
        f"fastapi {closure['fastapi']}: GHSA-aaaa-bbbb-cccc (CVE-2026-0001, PYSEC-2026-1) not allow-listed, "
        "fixed in 2.0.1: Request smuggling"
    ]


def test_a_malformed_allow_list_names_the_file_and_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "allow.toml"
    path.write_text('[[vulnerability]]\nid = "GHSA-1"\npackage = "web"\nreason = "r"\nexpires = "soon"\n')
    with pytest.raises(AuditError) as error:
        load_allowlist(path)
    assert str(path) in str(error.value)
    assert "[[vulnerability]] entry 1 (id = 'GHSA-1', package = 'web'), expires" in str(error.value)
    path.write_text('[[vulnerability]]\nid = "GHSA-1"\npackage = "web"\nexpires = 2027-01-01\nwhy = "r"\n')
    entry = r"\[\[vulnerability\]\] entry 1 \(id = 'GHSA-1', package = 'web'\), (reason|why)"
    with pytest.raises(AuditError, match=entry):
        load_allowlist(path)
    path.write_text("[[vulnerability]\n")
    with pytest.raises(AuditError, match="not valid TOML"):
        load_allowlist(path)


def test_the_committed_allow_list_is_valid_and_explains_every_entry() -> None:
    allowlist = load_allowlist(ALLOWLIST)
    assert all(len(e.reason) > 40 for e in allowlist.vulnerability)


def test_a_bad_allow_list_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "allow.toml"
    path.write_text("[[unaudited]]\npackage = 1\n")  # a table the allow-list no longer has
    assert main(["--allowlist", str(path)]) == 2
    assert str(path) in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.enable_socket  # the one test that leaves loopback (the guard: tests/test_offline.py)
def test_the_lock_passes_the_audit_against_pypi() -> None:
    """The real audit of the lock, as `make audit` runs it. CI reaches PyPI (it pip-installs), so an
    unreachable PyPI is a failure here, never a skip: a skipped audit would read as a passed one."""
    try:
        reports = audit_closure(locked_closure(), pypi_fetch)
    except AuditError as e:
        unreachable = str(e)
    else:
        unreachable = ""
    if unreachable:
        pytest.fail(f"the dependency audit could not run ({unreachable}); it must run in CI", pytrace=False)
    verdict = evaluate(reports, load_allowlist(ALLOWLIST), date.today())
    assert verdict.failures == [], "\n".join(verdict.failures)
