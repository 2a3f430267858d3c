"""infra/k8s: every manifest parsed and checked offline (no cluster, no kubectl)."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest

from pipeline.cli import COMMANDS, build_parser
from pipeline.config import load_params
from tests.infra._infra import (
    INFRA,
    K8S,
    REPO,
    URL_PASSWORD,
    containers,
    image_tag_problem,
    is_secret_name,
    k8s_docs,
    k8s_object,
    k8s_objects,
    lock_pins,
    our_image,
    pod_specs,
    strings,
)

IMAGE_HOME = "/home/ray/ssd"  # where infra/docker/Dockerfile puts the repository (test_docker.py checks it)

# Field names of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/*_types.go, KubeRay 1.5): a misspelt
# field is silently dropped by the API server, so the tests refuse unknown ones.
RAYCLUSTER_SPEC = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
    "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions", "authOptions", "upgradeStrategy",
}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template", "resources", "labels"}
WORKER_GROUP = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
    "scaleStrategy", "suspend", "idleTimeoutSeconds", "resources", "labels",
}
AUTOSCALER_OPTIONS = {
    "resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
    "idleTimeoutSeconds", "upscalingMode", "version",
}
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML", "jobId",
    "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend", "schedule",
}


def _cluster_specs():
    return {
        "RayCluster": k8s_object("RayCluster", "ssd-gpu")["spec"],
        "RayJob": k8s_object("RayJob", "ssd300-voc")["spec"]["rayClusterSpec"],
    }


def _config_map(name: str) -> dict[str, str]:
    return k8s_object("ConfigMap", name)["data"]


def _container_env(container) -> dict[str, str | None]:
    """The container's environment as the kubelet builds it; a Secret's value is None (unknown here)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        env.update(_config_map(source["configMapRef"]["name"]))
    for item in container.get("env", []):
        env[item["name"]] = item.get("value") if "valueFrom" not in item else None
    return env


# ------------------------------------------------------------------------------------------- all files
def test_every_manifest_parses_and_names_its_kind():
    assert {p.name for p, _ in k8s_docs()} >= {
        "raycluster.yaml", "rayjob.yaml", "mlflow.yaml", "storage.yaml", "kustomization.yaml",
    }
    for path, doc in k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: apiVersion and kind"
        if doc["kind"] != "Kustomization":
            meta = doc.get("metadata", {})
            assert meta.get("name") or meta.get("generateName"), f"{path.name}: {doc['kind']} without a name"


def test_kustomization_lists_existing_files_and_no_secret_objects():
    (kustomization,) = k8s_objects("Kustomization")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert not k8s_objects("Secret"), "Secrets are created with kubectl from values you keep, never committed"


def test_images_are_pinned_and_ours_is_the_launchers():
    for path, doc in k8s_docs():
        for container in containers(doc):
            image = container["image"]
            assert image_tag_problem(image) is None, f"{path.name}: {image_tag_problem(image)}"
            if "ssd-train" in image:
                assert image == our_image(), f"{path.name}: one training image everywhere"


def test_every_container_requests_and_limits_cpu_and_memory_and_gpus_match():
    for path, doc in k8s_docs():
        for container in containers(doc):
            resources = container.get("resources", {})
            requests, limits = resources.get("requests", {}), resources.get("limits", {})
            where = f"{path.name}: container {container['name']}"
            assert {"cpu", "memory"} <= requests.keys() and {"cpu", "memory"} <= limits.keys(), where
            if "nvidia.com/gpu" in requests or "nvidia.com/gpu" in limits:
                # Kubernetes requires GPU requests == limits (extended resources cannot be overcommitted).
                assert requests.get("nvidia.com/gpu") == limits.get("nvidia.com/gpu"), where
                assert int(limits["nvidia.com/gpu"]) > 0, where


def test_no_credential_is_written_in_a_manifest():
    for path, doc in k8s_docs():
        for container in containers(doc):
            for item in container.get("env", []):
                if is_secret_name(item["name"]):
                    where = f"{path.name}: {item['name']} must come from a Secret"
                    assert "secretKeyRef" in item.get("valueFrom", {}), where
        if doc.get("kind") == "ConfigMap":
            for key, value in doc["data"].items():
                assert not is_secret_name(key), f"{path.name}: {key} in a ConfigMap"
                if key.endswith(".ini"):
                    ini = configparser.ConfigParser()
                    ini.read_string(value)
                    assert not any("password" in k for k in ini["mlflow"]), f"{path.name}: {key} holds a password"
        for text in strings(doc):
            assert not URL_PASSWORD.search(text), f"{path.name}: a URL with a password: {text}"


def test_secrets_the_manifests_use_are_the_ones_the_readme_tells_you_to_create():
    used = {
        item["valueFrom"]["secretKeyRef"]["name"]
        for _, doc in k8s_docs()
        for container in containers(doc)
        for item in container.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    }
    readme = (INFRA / "README.md").read_text(encoding="utf-8")
    assert used, "the manifests take their credentials from Secrets"
    for name in used:
        assert f"create secret generic {name}" in readme, f"README must say how to create Secret {name}"


def test_pods_run_as_non_root_without_privilege_escalation():
    for path, doc in k8s_docs():
        for spec in pod_specs(doc):
            assert spec.get("securityContext", {}).get("runAsNonRoot") is True, path.name
            assert spec["securityContext"].get("runAsUser", 1000) != 0, path.name
            for container in spec["containers"]:
                context = container.get("securityContext", {})
                assert context.get("allowPrivilegeEscalation") is False, f"{path.name}: {container['name']}"
                assert context.get("capabilities", {}).get("drop") == ["ALL"], f"{path.name}: {container['name']}"


# ---------------------------------------------------------------------------------------- Ray clusters
def test_rayjob_brings_up_the_same_cluster_as_the_raycluster():
    specs = _cluster_specs()
    assert specs["RayJob"] == specs["RayCluster"], "keep rayjob.yaml's rayClusterSpec equal to raycluster.yaml"


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_cluster_spec_fields_are_kuberays(owner):
    spec = _cluster_specs()[owner]
    assert set(spec) <= RAYCLUSTER_SPEC, set(spec) - RAYCLUSTER_SPEC
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP, set(group) - WORKER_GROUP
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    for params in [spec["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams values are strings"


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_cluster_runs_the_locked_ray_with_token_auth_and_private_head(owner):
    spec = _cluster_specs()[owner]
    assert spec["rayVersion"] == lock_pins()["ray"]
    assert spec["authOptions"] == {"mode": "token"}, "KubeRay makes the token and keeps it in a Secret"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    gpu_groups = [
        g for g in spec["workerGroupSpecs"]
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups, "a GPU worker group"
    for group in gpu_groups:
        tolerations = group["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), "GPU nodes are usually tainted"
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):  # KubeRay injects them; a literal copy would leak or clash
        assert all(name not in _container_env(c) for c in containers(spec))


def test_rayjob_entrypoint_is_a_real_cli_command_whose_params_validate(monkeypatch):
    job = k8s_object("RayJob", "ssd300-voc")["spec"]
    assert set(job) <= RAYJOB_SPEC, set(job) - RAYJOB_SPEC
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipeline"]
    assert argv[3] in {c.name for c in COMMANDS} and argv[3] == "train"
    args = build_parser().parse_args(argv[3:])  # the real parser: unknown options fail here

    # The driver runs on the head pod: resolve the params file there, with the head container's environment.
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for name, value in _container_env(head).items():
        monkeypatch.setenv(name, value if value is not None else "from-a-secret")
    params_path = str(args.params)
    assert params_path.startswith(IMAGE_HOME + "/"), "the params file ships in the image"
    local = REPO / Path(params_path).relative_to(IMAGE_HOME)
    params = load_params(local, [a for a in args.rest if "=" in a])
    assert params.train.use_gpu and params.model.preset == "ssd300_vgg16"

    gpus = sum(
        group["maxReplicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        for group in job["rayClusterSpec"]["workerGroupSpecs"]
        for c in group["template"]["spec"]["containers"]
    )
    assert params.train.num_workers <= gpus, "the run's ranks must fit the worker group at its largest"

    # Shards, checkpoints, weights and the model live on storage that the head and every worker mount.
    shared = None
    for spec in pod_specs(job["rayClusterSpec"]):
        mounts = {m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])
                  if any(v["name"] == m["name"] and "persistentVolumeClaim" in v for v in spec["volumes"])}
        shared = mounts if shared is None else shared & mounts
    assert shared, "a persistent volume mounted on every Ray pod"
    for path in (args.shards, str(args.model_out), params.train.storage_path, params.model.pretrained_backbone):
        assert urlparse(path).scheme == "s3" or any(path.startswith(m + "/") for m in shared), path


def test_storage_claim_is_shared_by_all_pods():
    claim = k8s_object("PersistentVolumeClaim", "ssd-data")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for spec in pod_specs(_cluster_specs()["RayCluster"]):
        assert {"claimName": "ssd-data"} in [v.get("persistentVolumeClaim") for v in spec["volumes"]]


def test_shard_sync_job_copies_into_the_volume_the_job_reads():
    (job,) = k8s_objects("Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    script = container["args"][0]
    compile(script, "shards-sync-job.yaml", "exec")  # the inline Python is at least valid Python
    entry = shlex.split(k8s_object("RayJob", "ssd300-voc")["spec"]["entrypoint"])
    assert f'"{entry[entry.index("--shards") + 1]}"' in script
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


# ---------------------------------------------------------------------------------------------- MLflow
def test_mlflow_server_uses_postgres_s3_basic_auth_and_secrets():
    deployment = k8s_object("Deployment", "mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"ghcr.io/mlflow/mlflow:v{lock_pins()['mlflow']}-full", "server = client version"
    assert container["command"] == ["mlflow", "server"]
    assert "--app-name=basic-auth" in container["args"] and "--serve-artifacts" in container["args"]
    env = _container_env(container)
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert urlparse(env["MLFLOW_BACKEND_STORE_URI"]).password is None
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    for name in ("PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD",
                 "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert name in env and env[name] is None, f"{name} must come from a Secret"
    ini = configparser.ConfigParser()
    ini.read_string(_config_map("mlflow-config")["basic_auth.ini"])
    assert urlparse(ini["mlflow"]["database_uri"]).path == "/mlflow_auth"
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(env["MLFLOW_AUTH_CONFIG_PATH"]).parent) in mounted
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"  # unauthenticated in the auth app


def test_mlflow_service_reaches_the_pods_and_the_training_env_points_at_it():
    deployment = k8s_object("Deployment", "mlflow")
    service = k8s_object("Service", "mlflow")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    (kustomization,) = k8s_objects("Kustomization")
    uri = urlparse(_config_map("ssd-train-env")["MLFLOW_TRACKING_URI"])
    assert uri.hostname == f"mlflow.{kustomization['namespace']}.svc.cluster.local" and uri.port == port["port"]
    allowed = _config_map("mlflow-config")["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert f"{uri.hostname}:*" in allowed, "MLflow's host check must accept the name the trainers use"
