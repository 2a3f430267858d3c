"""infra/k8s: every manifest parsed and checked offline (no cluster, no kubectl)."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import pytest

from pipeline.cli import COMMANDS, build_parser
from pipeline.config import load_params
from tests.infra._infra import (
    CLUSTER_YAML,
    INFRA,
    K8S,
    PLACEHOLDER_DIGEST,
    REPO,
    URL_PASSWORD,
    containers,
    image_parts,
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
    "headGroupSpec",
    "workerGroupSpecs",
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headServiceAnnotations",
    "suspend",
    "managedBy",
    "gcsFaultToleranceOptions",
    "authOptions",
    "upgradeStrategy",
}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template", "resources", "labels"}
WORKER_GROUP = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "numOfHosts",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "suspend",
    "idleTimeoutSeconds",
    "resources",
    "labels",
}
AUTOSCALER_OPTIONS = {
    "resources",
    "image",
    "imagePullPolicy",
    "env",
    "envFrom",
    "volumeMounts",
    "securityContext",
    "idleTimeoutSeconds",
    "upscalingMode",
    "version",
}
RAYJOB_SPEC = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionStrategy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes",
    "suspend",
    "schedule",
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
        "raycluster.yaml",
        "rayjob.yaml",
        "mlflow.yaml",
        "storage.yaml",
        "kustomization.yaml",
        "rbac.yaml",
        "mlflow-networkpolicy.yaml",
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


def test_every_image_is_pinned_by_digest_with_a_tag_for_people():
    images = [(path, c["image"]) for path, doc in k8s_docs() for c in containers(doc)]
    assert {image_parts(image)[0].rsplit("/", 1)[-1] for _, image in images} == {"ssd-train", "mlflow"}
    for path, image in images:
        name, tag, digest = image_parts(image)
        # infra/README.md, section 1: the kubelet pulls the digest; the tag says which release it is.
        assert tag and digest, f"{path.name}: expected {name}:<tag>@sha256:<64 hex>, got {image}"


def test_placeholder_digests_are_marked_change_and_the_readme_says_how_to_fill_each():
    readme = (INFRA / "README.md").read_text(encoding="utf-8")
    files = sorted(K8S.glob("*.yaml")) + [CLUSTER_YAML]
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if "@sha256:" + PLACEHOLDER_DIGEST in line:
                assert "# CHANGE" in line, f"{path.name}:{number}: a placeholder digest must be marked CHANGE"
    sed_lines = [line for line in readme.splitlines() if "sed -i" in line]
    placeholders = {
        image_parts(c["image"])[0]
        for _, doc in k8s_docs()
        for c in containers(doc)
        if image_parts(c["image"])[2] == PLACEHOLDER_DIGEST
    }
    for name in placeholders:  # the README's sed line that writes the real digest over this image's placeholder
        assert any(f"{name}:" in line for line in sed_lines), f"README: how to fill in the digest of {name}"
    assert 'grep -rn "@sha256:0\\{64\\}" infra/ray infra/k8s' in readme, "and how to find any left"


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


def test_secrets_the_manifests_use_are_the_ones_the_readme_tells_you_to_create_in_their_namespace():
    used = _secrets_used()
    readme = (INFRA / "README.md").read_text(encoding="utf-8")
    created = set(re.findall(r"kubectl -n (\S+) create secret generic (\S+)", readme))
    assert used, "the manifests take their credentials from Secrets"
    # A pod reads Secrets of its own namespace only, so each must be created exactly there.
    assert used == created, f"README creates {sorted(created - used)} unused; misses {sorted(used - created)}"


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
        g
        for g in spec["workerGroupSpecs"]
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
    assert params.train.worker_range[1] <= gpus, "the run's ranks must fit the worker group at its largest"

    # Shards, checkpoints, weights and the model live on storage that the head and every worker mount.
    shared = None
    for spec in pod_specs(job["rayClusterSpec"]):
        mounts = {
            m["mountPath"]
            for c in spec["containers"]
            for m in c.get("volumeMounts", [])
            if any(v["name"] == m["name"] and "persistentVolumeClaim" in v for v in spec["volumes"])
        }
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
    name, tag, _ = image_parts(container["image"])
    assert (name, tag) == ("ghcr.io/mlflow/mlflow", f"v{lock_pins()['mlflow']}-full"), "server = client version"
    assert container["command"] == ["mlflow", "server"]
    assert "--app-name=basic-auth" in container["args"] and "--serve-artifacts" in container["args"]
    env = _container_env(container)
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert urlparse(env["MLFLOW_BACKEND_STORE_URI"]).password is None
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    for name in (
        "PGPASSWORD",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    ):
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
    namespace = service["metadata"]["namespace"]
    assert k8s_object("ConfigMap", "ssd-train-env")["metadata"]["namespace"] != namespace
    uri = urlparse(_config_map("ssd-train-env")["MLFLOW_TRACKING_URI"])
    assert uri.hostname == f"mlflow.{namespace}.svc.cluster.local" and uri.port == port["port"]
    allowed = _config_map("mlflow-config")["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert f"{uri.hostname}:*" in allowed, "MLflow's host check must accept the name the trainers use"


# ------------------------------------------------------------------ namespaces, Secrets, network, RBAC
# What KubeRay adds for a RayCluster with enableInTreeAutoscaling: a Role named after the cluster, bound to the
# head pod's service account in the cluster's namespace (ray-operator/controllers/ray/common/rbac.go, BuildRole
# and BuildRoleBinding, KubeRay 1.5). It is made by the operator, not by these files, so the RBAC checks add it.
KUBERAY_AUTOSCALER_RULES = (
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [""], "resources": ["pods/resize"], "verbs": ["patch"]},
    {"apiGroups": ["ray.io"], "resources": ["rayclusters"], "verbs": ["get", "patch"]},
)
RAY_NAMESPACE, MLFLOW_NAMESPACE = "ssd", "mlflow"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "Kustomization"}


class Pod(NamedTuple):
    """A pod as the network and RBAC checks see it: where it runs, its labels, ports and service account."""

    name: str
    namespace: str
    labels: dict[str, str]
    ports: dict[str, int]  # container port name -> number
    service_account: str
    automount_token: bool


def _namespace_of(doc: dict[str, Any]) -> str:
    namespace = doc["metadata"].get("namespace")
    assert namespace, f"{doc['kind']} {doc['metadata'].get('name')}: no namespace"
    return namespace


def _pod(name: str, owner: dict[str, Any], template: dict[str, Any]) -> Pod:
    spec = template["spec"]
    account = spec.get("serviceAccountName", "default")
    accounts = {
        a["metadata"]["name"]: a
        for a in k8s_objects("ServiceAccount")
        if a["metadata"]["namespace"] == _namespace_of(owner)
    }
    automount = spec.get("automountServiceAccountToken", accounts.get(account, {}).get("automountServiceAccountToken"))
    return Pod(
        name=name,
        namespace=_namespace_of(owner),
        labels=dict(template["metadata"].get("labels", {})),
        ports={p["name"]: p["containerPort"] for c in spec["containers"] for p in c.get("ports", []) if "name" in p},
        service_account=account,
        automount_token=automount is not False,
    )


def _ray_pods() -> list[Pod]:
    """The head and worker pods of the standing RayCluster and of the RayJob's cluster."""
    pods = []
    for owner, spec in (
        (k8s_object("RayCluster", "ssd-gpu"), k8s_object("RayCluster", "ssd-gpu")["spec"]),
        (k8s_object("RayJob", "ssd300-voc"), k8s_object("RayJob", "ssd300-voc")["spec"]["rayClusterSpec"]),
    ):
        pods.append(_pod(f"{owner['kind']} head", owner, spec["headGroupSpec"]["template"]))
        for group in spec["workerGroupSpecs"]:
            pods.append(_pod(f"{owner['kind']} {group['groupName']}", owner, group["template"]))
    return pods


def _mlflow_pod() -> Pod:
    deployment = k8s_object("Deployment", "mlflow")
    return _pod("mlflow", deployment, deployment["spec"]["template"])


def _sync_pod() -> Pod:
    (job,) = k8s_objects("Job")
    return _pod("shards sync", job, job["spec"]["template"])


def _secrets_used() -> set[tuple[str, str]]:
    """(namespace, Secret name) of every secretKeyRef in the pods of the manifests."""
    owners = [
        k8s_object("RayCluster", "ssd-gpu"),
        k8s_object("RayJob", "ssd300-voc"),
        k8s_object("Deployment", "mlflow"),
        *k8s_objects("Job"),
    ]
    return {
        (_namespace_of(owner), item["valueFrom"]["secretKeyRef"]["name"])
        for owner in owners
        for container in containers(owner)
        for item in container.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    }


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels AND matchExpressions) against a set of labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        held = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not held:
            return False
    return True


def _namespace_labels(name: str) -> dict[str, str]:
    declared = [n for n in k8s_objects("Namespace") if n["metadata"]["name"] == name]
    labels = dict(declared[0]["metadata"].get("labels", {})) if declared else {}
    return {**labels, "kubernetes.io/metadata.name": name}  # the API server sets this one on every namespace


def _ingress_allowed(source: Pod, target: Pod, port: int) -> bool:
    """Whether the NetworkPolicies of the manifests let ``source`` open TCP ``port`` on ``target``.

    The NetworkPolicy rules for ingress: a pod that no policy with policyType Ingress selects accepts everything;
    otherwise a connection needs one rule of one selecting policy whose ``from`` peers and ``ports`` both match.
    A peer with both namespaceSelector and podSelector needs both; a podSelector alone means the policy's own
    namespace; a missing ``from`` or ``ports`` matches all. Named ports resolve against the target's ports.
    """
    policies = [
        p
        for p in k8s_objects("NetworkPolicy")
        if _namespace_of(p) == target.namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and _selects(p["spec"]["podSelector"], target.labels)
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = [
                target.ports.get(p["port"], p["port"])
                for p in rule.get("ports", [])
                if p.get("protocol", "TCP") == "TCP"
            ]
            if rule.get("ports") and port not in ports:
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                assert "ipBlock" not in peer, "ipBlock peers are not modelled here"
                if "namespaceSelector" in peer:
                    namespace_ok = _selects(peer["namespaceSelector"], _namespace_labels(source.namespace))
                else:
                    namespace_ok = source.namespace == _namespace_of(policy)
                if namespace_ok and _selects(peer.get("podSelector", {}), source.labels):
                    return True
    return False


def test_every_namespaced_object_names_its_namespace_and_the_kustomization_moves_none():
    (kustomization,) = k8s_objects("Kustomization")
    assert "namespace" not in kustomization, "a kustomization namespace would put MLflow beside the Ray pods"
    declared = {n["metadata"]["name"] for n in k8s_objects("Namespace")}
    assert declared == {RAY_NAMESPACE, MLFLOW_NAMESPACE}
    for path, doc in k8s_docs():
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") in declared, f"{path.name}: {doc['kind']} names no namespace"
    for resource in kustomization["resources"]:  # every long-lived file is applied by `kubectl apply -k`
        assert resource in {
            "namespace.yaml",
            "rbac.yaml",
            "storage.yaml",
            "train-env.yaml",
            "mlflow.yaml",
            "mlflow-networkpolicy.yaml",
        }


def test_mlflow_and_its_secrets_live_apart_from_the_training_pods():
    assert {p.namespace for p in _ray_pods()} == {RAY_NAMESPACE}
    assert _mlflow_pod().namespace == MLFLOW_NAMESPACE
    assert _namespace_of(k8s_object("ConfigMap", "mlflow-config")) == MLFLOW_NAMESPACE
    used = _secrets_used()
    mlflow_secrets = {name for namespace, name in used if namespace == MLFLOW_NAMESPACE}
    ray_secrets = {name for namespace, name in used if namespace == RAY_NAMESPACE}
    assert mlflow_secrets == {"mlflow-db", "mlflow-s3", "mlflow-auth"}
    # The training pods' namespace holds only what they (and the sync Job) read: never MLflow's own credentials.
    assert ray_secrets == {"ssd-mlflow-client", "ssd-s3"}
    ray_pod_secrets = {
        item["valueFrom"]["secretKeyRef"]["name"]
        for spec in _cluster_specs().values()
        for c in containers(spec)
        for item in c.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    }
    assert ray_pod_secrets == {"ssd-mlflow-client"}, "the Ray pods need the training user's MLflow login only"


def test_only_the_ray_pods_reach_mlflow_and_only_mlflow_reaches_its_database():
    mlflow = _mlflow_pod()
    port = mlflow.ports["http"]
    database = Pod("mlflow-db", MLFLOW_NAMESPACE, {"app.kubernetes.io/name": "mlflow-db"}, {}, "default", False)
    for pod in _ray_pods():
        assert _ingress_allowed(pod, mlflow, port), f"{pod.name} must reach MLflow"
        assert not _ingress_allowed(pod, mlflow, 22), f"{pod.name}: MLflow's HTTP port only"
        assert not _ingress_allowed(pod, database, 5432), f"{pod.name} must not reach MLflow's database"
    head = next(p for p in _ray_pods() if p.labels.get("app.kubernetes.io/component") == "ray-head")
    outsiders = [
        _sync_pod(),  # same namespace as the trainers, other labels
        Pod("KubeRay's job submitter", RAY_NAMESPACE, {"batch.kubernetes.io/job-name": "ssd300-voc"}, {}, "", True),
        head._replace(name="a look-alike in another namespace", namespace="default"),
        Pod("a pod of the mlflow namespace", MLFLOW_NAMESPACE, {"app": "debug"}, {}, "default", True),
    ]
    for pod in outsiders:
        assert not _ingress_allowed(pod, mlflow, port), f"{pod.name} must not reach MLflow"
    assert _ingress_allowed(mlflow, database, 5432)
    assert not _ingress_allowed(mlflow, database, 5433)
    # Default deny: a pod added to the mlflow namespace later accepts nothing until a policy admits it.
    newcomer = Pod("newcomer", MLFLOW_NAMESPACE, {"app": "new"}, {"http": 8080}, "default", True)
    for pod in [*_ray_pods(), mlflow]:
        assert not _ingress_allowed(pod, newcomer, 8080)


def _grants(pod: Pod) -> list[tuple[str, dict[str, Any]]]:
    """(namespace or "*" for cluster-wide, rule) for every RBAC rule that reaches ``pod``'s service account."""
    subjects_of_pod = {
        ("ServiceAccount", pod.service_account, pod.namespace),
        ("Group", "system:serviceaccounts", None),
        ("Group", f"system:serviceaccounts:{pod.namespace}", None),
        ("Group", "system:authenticated", None),
    }
    roles = {(_namespace_of(r), r["metadata"]["name"]): r["rules"] for r in k8s_objects("Role")}
    cluster_roles = {r["metadata"]["name"]: r.get("rules", []) for r in k8s_objects("ClusterRole")}
    grants = []
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        for binding in k8s_objects(kind):
            subjects = {(s["kind"], s["name"], s.get("namespace")) for s in binding.get("subjects", [])}
            if not subjects & subjects_of_pod:
                continue
            scope = _namespace_of(binding) if kind == "RoleBinding" else "*"
            ref = binding["roleRef"]
            if ref["kind"] == "Role":
                rules = roles[(scope, ref["name"])]
            else:
                assert ref["name"] in cluster_roles, f"{kind} {binding['metadata']['name']}: unknown ClusterRole"
                rules = cluster_roles[ref["name"]]
            grants += [(scope, rule) for rule in rules]
    if pod.labels.get("app.kubernetes.io/component") == "ray-head":
        grants += [(pod.namespace, rule) for rule in KUBERAY_AUTOSCALER_RULES]
    return grants


def test_ray_pods_run_under_their_own_service_accounts_that_cannot_read_secrets():
    accounts = {(_namespace_of(a), a["metadata"]["name"]): a for a in k8s_objects("ServiceAccount")}
    for pod in _ray_pods():
        assert (pod.namespace, pod.service_account) in accounts, f"{pod.name}: a service account of the manifests"
        assert pod.service_account != "default"
        for scope, rule in _grants(pod):
            resources = set(rule.get("resources", [])) | {r.split("/")[0] for r in rule.get("resources", [])}
            reads_secrets = "" in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", [])
            reads_secrets &= bool(resources & {"secrets", "*"})
            assert not reads_secrets, f"{pod.name}: {scope} grants {rule}"
            assert scope == pod.namespace, f"{pod.name}: only its own namespace, got {scope}"
        role = pod.labels["app.kubernetes.io/component"]
        # The workers call no Kubernetes API; only the head's autoscaler does.
        assert pod.automount_token is (role == "ray-head"), f"{pod.name}: API token mounted only on the head"
    heads = {p.service_account for p in _ray_pods() if p.labels["app.kubernetes.io/component"] == "ray-head"}
    others = {p.service_account for p in [_mlflow_pod(), _sync_pod()]}
    assert not heads & others, "the head's service account (and its autoscaler Role) is the Ray pods' alone"
    for pod in (_mlflow_pod(), _sync_pod()):
        assert not pod.automount_token, f"{pod.name} calls no Kubernetes API, so it mounts no token"
    # Nothing in the manifests binds anything in MLflow's namespace to anyone.
    for kind in ("RoleBinding", "Role"):
        assert not [b for b in k8s_objects(kind) if _namespace_of(b) == MLFLOW_NAMESPACE]
    assert not k8s_objects("ClusterRoleBinding")
