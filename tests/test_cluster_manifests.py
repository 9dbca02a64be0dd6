"""Offline checks of the deployment files in cluster/.

The RayJob and RayCluster manifests are validated against the openAPIV3Schema of the vendored KubeRay CRDs
(cluster/crds/, apiVersion ray.io/v1), made strict the way `kubectl apply` (server-side strict field validation)
is: an unknown field is an error. Then the files are cross-checked against each other and the repository: one
image everywhere and the one the README builds, the entrypoint's config loads, secret and PVC names and keys match,
the GPU group asks for GPUs, the Dockerfile bakes in the code. No cluster, no network, no Ray.
"""

import copy
import functools
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gradfilter_ray.config import load as load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRD_DIR = CLUSTER / "crds"
SHARED_MOUNT = "/mnt/shared"

# libyaml when available: the two CRDs are ~2.3 MB of YAML.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Variable names that look like credentials: HF_TOKEN, OPENAI_API_KEY, auth_token (not TOKENIZERS_PARALLELISM).
_SECRETISH = re.compile(r"(?:^|_)(?:TOKEN|KEY|SECRET|PASSWORD)(?:_|$)", re.IGNORECASE)
_INT32 = {"minimum": -(2**31), "maximum": 2**31 - 1}
_INT64 = {"minimum": -(2**63), "maximum": 2**63 - 1}


def _yaml(path: Path) -> Any:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER)


# ---------------------------------------------------------------------------------------------------------------
# openAPIV3Schema (Kubernetes structural schema) -> JSON Schema (Draft 7)


def to_json_schema(node: Any) -> Any:
    """Translate the Kubernetes dialect of OpenAPI v3 into plain Draft-7 JSON Schema.

    - `x-kubernetes-int-or-string: true` -> int or string (a `pattern`, e.g. for quantities, still applies to
      strings only, as in Kubernetes);
    - `nullable: true` -> `null` is also allowed;
    - an object with `properties` and neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields`
      rejects unknown fields (kubectl's default strict field validation; the API server would otherwise prune them
      silently, which hides typos);
    - `format: int32/int64` -> the integer range;
    - other `x-kubernetes-*` keys (list types, map types, CEL `x-kubernetes-validations`) are dropped: they
      constrain updates or need a CEL evaluator, not the shape checked here.
    """
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: to_json_schema(value) for key, value in node.items() if not key.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("format") == "int32":
        out.update(_INT32)
    elif out.get("format") == "int64":
        out.update(_INT64)
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schemas() -> dict[str, tuple[str, dict]]:
    """kind -> (apiVersion, raw openAPIV3Schema of version v1), from every CRD file in cluster/crds/."""
    found: dict[str, tuple[str, dict]] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for doc in yaml.load_all(path.read_text(encoding="utf-8"), Loader=_LOADER):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                if version["name"] == "v1":
                    found[kind] = (f"{group}/v1", version["schema"]["openAPIV3Schema"])
    return found


@functools.cache
def validator(kind: str) -> jsonschema.Draft7Validator:
    # No Draft7Validator.check_schema here: it costs ~1 s on these schemas; the negative tests below prove that the
    # translated schema rejects what it should.
    return jsonschema.Draft7Validator(to_json_schema(crd_schemas()[kind][1]))


def schema_errors(kind: str, doc: dict) -> list[str]:
    errors = sorted(validator(kind).iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors]


# ---------------------------------------------------------------------------------------------------------------
# The files under test


@functools.cache
def _files() -> dict[str, Any]:
    return {
        "RayJob": _yaml(CLUSTER / "rayjob.yaml"),
        "RayCluster": _yaml(CLUSTER / "raycluster.yaml"),
        "secret": _yaml(CLUSTER / "secret.example.yaml"),
        "pvc": _yaml(CLUSTER / "pvc.yaml"),
        "launcher": _yaml(CLUSTER / "cluster-launcher-aws.yaml"),
    }


def manifest(kind: str) -> dict:
    return copy.deepcopy(_files()[kind])


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(doc)
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(group["groupName"], group["template"]["spec"]) for group in spec.get("workerGroupSpecs", [])]
    return pods


def containers(doc: dict) -> list[dict]:
    return [c for _, pod in pod_specs(doc) for c in pod.get("containers", []) + pod.get("initContainers", [])]


def walk(node: Any, key: str):
    """Every value stored under `key` anywhere in a nested document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def readme_image() -> str:
    match = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", (CLUSTER / "README.md").read_text())
    assert match, "cluster/README.md must say `docker build -f cluster/Dockerfile -t <image> .`"
    return match.group(1)


def project_version() -> str:
    match = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert match, "pyproject.toml holds the project version"
    return match.group(1)


def ray_pin() -> str:
    match = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert match, "constraints.txt pins ray"
    return match.group(1)


def secret_keys() -> set[str]:
    secret = _files()["secret"]
    return set(secret.get("stringData", {})) | set(secret.get("data", {}))


def entrypoint() -> list[str]:
    return shlex.split(manifest("RayJob")["spec"]["entrypoint"])


def entrypoint_args() -> tuple[str, list[str]]:
    argv = entrypoint()
    config, overrides = None, []
    for flag, value in zip(argv, argv[1:]):
        if flag == "--config":
            config = value
        elif flag == "--set":
            overrides.append(value)
    assert config, f"no --config in the entrypoint {argv}"
    return config, overrides


MANIFESTS = ["RayJob", "RayCluster"]


# ---------------------------------------------------------------------------------------------------------------
# Schema validation


def test_crds_hold_nontrivial_v1_schemas():
    schemas = crd_schemas()
    assert set(schemas) >= {"RayJob", "RayCluster"}, sorted(schemas)
    job_spec = schemas["RayJob"][1]["properties"]["spec"]["properties"]
    cluster = schemas["RayCluster"][1]["properties"]["spec"]["properties"]
    # A broken extraction (wrong version, empty schema) must not let the validation pass vacuously.
    assert {"entrypoint", "rayClusterSpec", "shutdownAfterJobFinishes", "submissionMode"} <= set(job_spec)
    assert {"headGroupSpec", "workerGroupSpecs", "rayVersion", "authOptions"} <= set(cluster)
    assert len(job_spec) > 15 and len(cluster) > 10
    assert "template" in job_spec["rayClusterSpec"]["properties"]["headGroupSpec"]["required"]
    for kind in MANIFESTS:
        assert schemas[kind][0] == "ray.io/v1"


@pytest.mark.parametrize("kind", MANIFESTS)
def test_manifest_validates_against_kuberay_crd(kind):
    doc = manifest(kind)
    assert doc["apiVersion"] == crd_schemas()[kind][0] and doc["kind"] == kind
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), doc["metadata"]["name"]
    assert schema_errors(kind, doc) == []


def _replicas_not_an_int(spec):
    spec["workerGroupSpecs"][0]["replicas"] = "many"


def _unknown_field(spec):
    spec["enableInServiceAutoscaling"] = True  # the real field is enableInTreeAutoscaling


def _bad_enum(spec):
    spec["authOptions"]["mode"] = "tokens"


def _container_without_name(spec):
    del spec["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]


def _gpu_limit_not_a_quantity(spec):
    limits = spec["workerGroupSpecs"][-1]["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["nvidia.com/gpu"] = "8 GPUs"


def _replicas_over_int32(spec):
    spec["workerGroupSpecs"][0]["maxReplicas"] = 2**31


@pytest.mark.parametrize("kind", MANIFESTS)
@pytest.mark.parametrize(
    "breakage",
    [
        _replicas_not_an_int,
        _unknown_field,
        _bad_enum,
        _container_without_name,
        _gpu_limit_not_a_quantity,
        _replicas_over_int32,
    ],
)
def test_validator_rejects_broken_manifest(kind, breakage):
    doc = manifest(kind)
    breakage(cluster_spec(doc))
    assert schema_errors(kind, doc), f"{breakage.__name__} passed validation: the validator does not bite"


def test_rayjob_top_level_typo_is_rejected():
    doc = manifest("RayJob")
    doc["spec"]["shutdownAfterJobFinish"] = True
    assert schema_errors("RayJob", doc)


def test_int_or_string_quantities():
    doc = manifest("RayCluster")
    limits = cluster_spec(doc)["workerGroupSpecs"][-1]["template"]["spec"]["containers"][0]["resources"]["limits"]
    for ok in (8, "8", "500m", "1Gi"):
        limits["cpu"] = ok
        assert schema_errors("RayCluster", doc) == [], ok
    for bad in (8.5, True, "lots"):
        limits["cpu"] = bad
        assert schema_errors("RayCluster", doc), bad


# ---------------------------------------------------------------------------------------------------------------
# Cross-references


def test_one_image_everywhere_and_it_is_the_one_the_readme_builds():
    image = readme_image()
    assert f"docker push {image}" in (CLUSTER / "README.md").read_text()
    for kind in MANIFESTS:
        doc = manifest(kind)
        images = {c["image"] for c in containers(doc)}
        autoscaler_image = cluster_spec(doc).get("autoscalerOptions", {}).get("image")
        images |= {autoscaler_image} if autoscaler_image else set()
        assert images == {image}, (kind, images)
    assert _files()["launcher"]["docker"]["image"] == image
    # The tag is the project version, and the Dockerfile labels the image with it.
    assert image.rsplit(":", 1)[1] == project_version()
    assert f"ARG PROJECT_VERSION={project_version()}" in (CLUSTER / "Dockerfile").read_text()


def test_ray_version_is_the_same_in_image_manifests_and_constraints():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-\S*gpu\S*$", dockerfile, re.MULTILINE)
    assert base, "the image is built FROM a rayproject/ray GPU image"
    assert base.group(1) == ray_pin()
    for kind in MANIFESTS:
        assert cluster_spec(manifest(kind))["rayVersion"] == ray_pin()


def test_rayjob_and_raycluster_describe_the_same_cluster():
    """Same groups, pods, storage, secrets and auth; only the replica counts may differ."""

    def without_replicas(spec: dict) -> dict:
        spec = copy.deepcopy(spec)
        for group in spec.get("workerGroupSpecs", []):
            group.pop("replicas", None)
        return spec

    assert without_replicas(cluster_spec(manifest("RayJob"))) == without_replicas(cluster_spec(manifest("RayCluster")))


def test_entrypoint_config_exists_and_loads():
    argv = entrypoint()
    assert argv[0] == "python"
    script = argv[1]
    # jobs/run.py is written by another change; while it is absent the path string itself is pinned here.
    assert script == "jobs/run.py"
    if (ROOT / script).exists():
        assert (ROOT / script).is_file()
    config_path, overrides = entrypoint_args()
    assert config_path.startswith("jobs/configs/") and (ROOT / config_path).is_file(), config_path
    cfg = load_config(ROOT / config_path, overrides)
    # Every node must reach the run directory and the input: both on the shared PVC.
    assert cfg.output_dir.startswith(SHARED_MOUNT + "/"), cfg.output_dir
    assert cfg.data.path.startswith(SHARED_MOUNT + "/"), cfg.data.path


def test_rayjob_lifecycle_and_runtime_env():
    spec = manifest("RayJob")["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) == {"env_vars"}, "the image holds the code: no working_dir / pip in the runtime env"
    env_vars = runtime_env["env_vars"]
    assert all(isinstance(v, str) for v in env_vars.values()), "runtime_env env_vars must be strings"
    assert not [name for name in env_vars if _SECRETISH.search(name)], "secrets belong in the Secret"
    assert env_vars["HF_HOME"].startswith(SHARED_MOUNT + "/")


@pytest.mark.parametrize("kind", MANIFESTS)
def test_secrets_come_from_the_example_secret(kind):
    doc = manifest(kind)
    secret_name = _files()["secret"]["metadata"]["name"]
    refs = list(walk(doc, "secretKeyRef"))
    assert refs
    for ref in refs:
        assert ref["name"] == secret_name
        assert ref["key"] in secret_keys(), ref
    for container in containers(doc):
        env = {e["name"]: e for e in container.get("env", [])}
        for name in ("HF_TOKEN", "OPENAI_API_KEY"):
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == secret_name, (container["name"], name)
        literal = [e["name"] for e in env.values() if "value" in e and _SECRETISH.search(e["name"])]
        assert not literal, f"secret-looking env vars with literal values: {literal}"


@pytest.mark.parametrize("kind", MANIFESTS)
def test_token_auth_uses_the_crd_field_and_our_secret(kind):
    spec = cluster_spec(manifest(kind))
    assert spec["authOptions"]["mode"] == "token"
    assert spec["authOptions"]["secretName"] == _files()["secret"]["metadata"]["name"]
    assert "auth_token" in secret_keys(), "KubeRay reads the token from the key `auth_token`"
    major, minor, _ = (int(x) for x in spec["rayVersion"].split("."))
    assert (major, minor) >= (2, 52), "authOptions needs Ray 2.52+"


def test_example_secret_holds_only_placeholders():
    secret = _files()["secret"]
    assert secret["kind"] == "Secret" and "data" not in secret
    for key, value in secret["stringData"].items():
        assert "replace" in value.lower(), f"{key}: real-looking value in the committed template"


@pytest.mark.parametrize("kind", MANIFESTS)
def test_every_pod_mounts_the_shared_pvc(kind):
    doc = manifest(kind)
    pvc = _files()["pvc"]
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    claims = list(walk(doc, "persistentVolumeClaim"))
    assert claims and all(c["claimName"] == pvc["metadata"]["name"] for c in claims)
    for group, pod in pod_specs(doc):
        shared = {v["name"] for v in pod.get("volumes", []) if v.get("persistentVolumeClaim")}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert mounts.get(SHARED_MOUNT) in shared, (group, container["name"])


@pytest.mark.parametrize("kind", MANIFESTS)
def test_groups_head_and_gpu_workers(kind):
    spec = cluster_spec(manifest(kind))
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "no work on the head"
    assert spec["enableInTreeAutoscaling"] is True

    def gpus(pod: dict) -> int:
        return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in pod["containers"])

    assert gpus(spec["headGroupSpec"]["template"]["spec"]) == 0
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    assert gpus(groups["gpu"]["template"]["spec"]) > 0, "the GPU group requests nvidia.com/gpu"
    assert gpus(groups["cpu"]["template"]["spec"]) == 0
    for name, group in groups.items():
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], name
        assert group["maxReplicas"] >= 1, name


def test_dockerfile_bakes_in_the_project():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    copies = " ".join(line for line in dockerfile.splitlines() if line.startswith("COPY "))
    for path in ("gradfilter_ray/", "jobs/", "pyproject.toml", "constraints.txt", "README.md"):
        assert path in copies, path
    workdir = re.findall(r"^WORKDIR (\S+)$", dockerfile, re.MULTILINE)
    assert workdir == ["/app"]
    for kind in MANIFESTS:
        assert {c.get("workingDir") for c in containers(manifest(kind))} == {"/app"}, kind
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "the image runs as a non-root user"
    assert "-c /tmp/constraints-gpu.txt" in dockerfile and "grep -v -i '^torch=='" in dockerfile
    instructions = re.sub(r"\\\n", " ", dockerfile)  # join continuation lines
    defined = [
        name
        for line in re.findall(r"^(?:ENV|ARG)\s+(.*)$", instructions, re.MULTILINE)
        for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", line)
    ]
    assert "PROJECT_VERSION" in defined
    assert not [name for name in defined if _SECRETISH.search(name)], "no secrets baked into the image"


def test_aws_launcher_config_is_well_formed():
    cfg = _files()["launcher"]
    required = {
        "cluster_name",
        "max_workers",
        "provider",
        "auth",
        "docker",
        "available_node_types",
        "head_node_type",
        "file_mounts",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    }
    assert required <= set(cfg), required - set(cfg)
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert len(types) >= 3, "head + CPU + GPU worker types"
    for name, node_type in types.items():
        assert node_type["node_config"]["InstanceType"], name
        if name != cfg["head_node_type"]:
            assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= cfg["max_workers"], name
    assert any(t["node_config"]["InstanceType"].startswith(("p", "g")) for t in types.values()), "a GPU type"
    assert all(isinstance(c, str) for c in cfg["setup_commands"] + cfg["head_start_ray_commands"])
