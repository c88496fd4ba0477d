"""Every manifest under k8s/ and every rendered kustomization validates: core kinds with
kubernetes-validate --strict (its bundled schemas, offline), RayService and RayCluster against
KubeRay's published CRD schemas (../shared/crds) with unknown fields rejected. Then the facts the
code relies on: custom resources, the Redis password and admin token variables, read-only model mounts,
group order, and network policies that admit only the Ray pods to the expert workers and Redis.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from nextserve.cluster.app_args import AppArgs
from nextserve.cluster.control.registry import STALE_AFTER_S
from nextserve.cluster.deployments.controller import WORKER_READY_TIMEOUT_S
from nextserve.cluster.deployments.expert_worker import EXPERT_RESOURCE, HEAD_RESOURCE
from nextserve.cluster.deployments.gateway import HEAD_PROBE_TIMEOUT_S
from nextserve.cluster.cli.k8s_overlay import (ADMIN_TOKEN_ENV, EXPERTS_GROUP, HEADS_GROUP, MODEL_MOUNT,
                                               REDIS_PASSWORD_ENV, REGISTRY_REDIS_URL)
from test_k8s_render import K8S, KUSTOMIZATIONS, Resource, by_key, render, render_lite

CRDS = K8S.parent.parent / "shared" / "crds"
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
RENDERED = KUSTOMIZATIONS + ["components/ingress"]


def _manifest_docs() -> list[tuple[str, Resource]]:
    """Kubernetes objects in k8s/ files (patches are lists, kustomizations are config: both skipped)."""
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") not in ("Kustomization", "Component"):
                docs.append((f"{path.relative_to(K8S)}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


@cache
def _rendered_json(name: str) -> str:
    objs = render(K8S / name) if not name.startswith("components/") else \
        render(K8S / "overlays/gpu") + render_lite(K8S / name)  # a component renders inside an overlay
    return json.dumps(objs)


def rendered(name: str) -> list[Resource]:
    return json.loads(_rendered_json(name))


def _strict(schema: Any) -> Any:
    """The schema with additionalProperties: false wherever an object lists its properties and does
    not preserve unknown fields, so a misspelled or unsupported field fails (as the API server prunes it)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd(kind: str) -> dict[str, Any]:
    path = CRDS / CRD_FILES[kind]
    if not path.exists():
        pytest.skip(f"KubeRay CRD {path} is absent: RayService/RayCluster schema validation skipped")
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB: C parser


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    version = next(v for v in crd(kind)["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


def validate_crd(resource: Resource) -> None:
    jsonschema.validate(resource, crd_schema(resource["kind"]), cls=jsonschema.Draft7Validator)


def validate_core(resource: Resource) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[dev]')")
    kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


def validate(resource: Resource) -> None:
    if resource["apiVersion"].startswith("ray.io/"):
        validate_crd(resource)
        if resource["kind"] == "RayService":
            validate_crd(as_raycluster(resource))
    else:
        validate_core(resource)


def as_raycluster(service: Resource) -> Resource:
    """The RayCluster KubeRay makes from a RayService's rayClusterConfig."""
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": service["metadata"]["name"]},
            "spec": copy.deepcopy(service["spec"]["rayClusterConfig"])}


MANIFEST_DOCS = _manifest_docs()


@pytest.mark.parametrize("label,doc", MANIFEST_DOCS, ids=[label for label, _ in MANIFEST_DOCS])
def test_every_manifest_validates(label: str, doc: Resource) -> None:
    validate(doc)


@pytest.mark.parametrize("name", RENDERED)
def test_every_rendered_kustomization_validates(name: str) -> None:
    objs = rendered(name)
    assert {"RayService", "Deployment", "Service", "PersistentVolumeClaim"} <= {r["kind"] for r in objs}
    for resource in sorted(objs, key=lambda r: r["apiVersion"].startswith("ray.io/")):  # core kinds first:
        validate(resource)  # a missing CRD file skips only what follows


def test_the_strict_validators_reject_unknown_fields() -> None:
    service = by_key(rendered("overlays/dev"))[("RayService", "nextserve")]
    bad = copy.deepcopy(service)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    with pytest.raises(jsonschema.ValidationError, match="minReplica"):
        validate_crd(bad)
    redis = copy.deepcopy(by_key(rendered("overlays/dev"))[("Deployment", "redis")])
    redis["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(Exception, match="imagePullPolicyy"):
        validate_core(redis)


def _groups(service: Resource) -> list[dict[str, Any]]:
    return service["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def _ray_pods(service: Resource) -> list[dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in _groups(service)]


def _custom_resources(group: dict[str, Any]) -> dict[str, int]:
    """rayStartParams.resources parsed as the Ray autoscaler does (strip the quotes, drop backslashes)."""
    return json.loads(group["rayStartParams"]["resources"][1:-1].replace("\\", ""))


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_groups_advertise_what_the_actors_ask_for(name: str) -> None:
    service = by_key(rendered(name))[("RayService", "nextserve")]
    groups = _groups(service)
    assert [g["groupName"] for g in groups][HEADS_GROUP] == "heads"
    assert [g["groupName"] for g in groups][EXPERTS_GROUP] == "experts"
    assert set(_custom_resources(groups[HEADS_GROUP])) == {HEAD_RESOURCE}
    assert set(_custom_resources(groups[EXPERTS_GROUP])) == {EXPERT_RESOURCE}
    assert service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    for group in groups:  # KubeRay's own checks (ValidateRayClusterSpec)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


def _pods_for(replicas: int, group: dict[str, Any], resource: str) -> int:
    """Pods of `group` that `replicas` actors asking for one unit of `resource` each need."""
    return -(-replicas // _custom_resources(group)[resource])


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_group_replica_ranges_match_the_autoscaling_ranges(name: str) -> None:
    """KubeRay's in-tree autoscaler gives the actors pods: each group's minReplicas / maxReplicas hold what
    the serve args' autoscale_heads / autoscale_expert_workers range asks for (a fixed size: min = max)."""
    service = by_key(rendered(name))[("RayService", "nextserve")]
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    groups = _groups(service)
    for index, resource, range_arg, fixed_arg in ((HEADS_GROUP, HEAD_RESOURCE, "autoscale_heads", "head_replicas"),
                                                  (EXPERTS_GROUP, EXPERT_RESOURCE, "autoscale_expert_workers",
                                                   "expert_workers")):
        fixed = args.get(fixed_arg, AppArgs.model_fields[fixed_arg].default)
        low, high = map(int, args[range_arg].split(":")) if args.get(range_arg) else (fixed, fixed)
        group = groups[index]
        assert group["minReplicas"] == _pods_for(low, group, resource), (name, group["groupName"])
        assert group["maxReplicas"] >= _pods_for(high, group, resource), (name, group["groupName"])
        if args.get(range_arg):
            assert group["maxReplicas"] == _pods_for(high, group, resource), (name, group["groupName"])
            assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def _serve_port(container: dict[str, Any], probe: dict[str, Any]) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    port = probe["httpGet"]["port"]
    return ports[port] if isinstance(port, str) else port


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_heads_pods_probe_the_per_pod_health_endpoints(name: str) -> None:
    """Readiness is /health/ready (this pod can serve: a degraded cluster stays in the Service), liveness
    /health/live (no dependency), and a startup probe outlasts a worker's first load; the cluster-wide
    /health is no probe (one lost head or a reloading worker would empty the Service)."""
    service = by_key(rendered(name))[("RayService", "nextserve")]
    container = _groups(service)[HEADS_GROUP]["template"]["spec"]["containers"][0]
    probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["startupProbe"]["httpGet"]["path"] == "/health/ready"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/health/live"
    for kind, probe in probes.items():
        assert _serve_port(container, probe) == 8000, kind  # the pod's Serve proxy (serve.start's port)
        # The gateway's own head probe gives up after HEAD_PROBE_TIMEOUT_S: the kubelet waits longer.
        assert probe["timeoutSeconds"] > HEAD_PROBE_TIMEOUT_S, kind
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 4 * WORKER_READY_TIMEOUT_S
    readiness = probes["readinessProbe"]  # a heartbeat goes stale after STALE_AFTER_S: a few periods ride it out
    assert readiness["periodSeconds"] * readiness["failureThreshold"] > STALE_AFTER_S
    for pod in _ray_pods(service):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert pod["containers"][0].get(probe, {}).get("httpGet", {}).get("path") != "/health", probe


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_ray_pod_mounts_the_model_read_only_and_has_the_redis_password(name: str) -> None:
    objs = by_key(rendered(name))
    service = objs[("RayService", "nextserve")]
    claim = objs[("PersistentVolumeClaim", "nextserve-model")]["metadata"]["name"]
    for pod in _ray_pods(service):
        container = pod["containers"][0]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = [m for m in container["volumeMounts"] if m["mountPath"] == MODEL_MOUNT]
        assert mounts and mounts[0]["readOnly"] is True
        assert volumes[mounts[0]["name"]]["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
        env = {e["name"]: e for e in container["env"]}
        assert env[REDIS_PASSWORD_ENV]["valueFrom"]["secretKeyRef"] == {"name": "nextserve-redis", "key": "password"}
    head_env = {e["name"] for e in _ray_pods(service)[0]["containers"][0]["env"]}
    assert not head_env & {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS"}, "KubeRay rejects these with gcsFaultToleranceOptions"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_ray_pod_has_the_admin_token_the_serve_config_names(name: str) -> None:
    service = by_key(rendered(name))[("RayService", "nextserve")]
    for pod in _ray_pods(service):
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env[ADMIN_TOKEN_ENV]["valueFrom"]["secretKeyRef"] == {"name": "nextserve-admin", "key": "token"}
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["admin_token_env"] == ADMIN_TOKEN_ENV and "admin_token" not in args


def _kuberay_pod_labels(service: Resource) -> dict[str, dict[str, str]]:
    """Each Ray pod's labels as KubeRay sets them (ray-operator labelPod): its own, then the template's,
    which win except for node type, group and cluster."""
    cluster = service["spec"]["rayClusterConfig"]
    groups = {"headgroup": ("head", cluster["headGroupSpec"]),
              **{g["groupName"]: ("worker", g) for g in _groups(service)}}
    out = {}
    for group, (node_type, spec) in groups.items():
        labels = {"ray.io/is-ray-node": "yes", "ray.io/cluster": "nextserve-raycluster-abcde",
                  "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
        labels |= spec["template"]["metadata"].get("labels", {})
        out[group] = labels | {"ray.io/node-type": node_type, "ray.io/group": group}
    return out


def _other_pod_labels(objs: dict[tuple[str, str], Resource]) -> dict[str, dict[str, str]]:
    """Labels of every pod the manifests make that is not a Ray pod (Deployments, Jobs)."""
    return {f"{kind}/{name}": r["spec"]["template"]["metadata"]["labels"] for (kind, name), r in objs.items()
            if kind in ("Deployment", "Job")}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is checked here, got {sorted(selector)}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_network_policies_admit_only_ray_pods_to_expert_workers_and_redis(name: str) -> None:
    objs = by_key(rendered(name))
    ray_pods = _kuberay_pod_labels(objs[("RayService", "nextserve")])
    others = _other_pod_labels(objs)
    assert "Deployment/redis" in others and (name == "base" or any(k.startswith("Job/") for k in others))
    redis_container = objs[("Deployment", "redis")]["spec"]["template"]["spec"]["containers"][0]
    targets = {"nextserve-expert-workers": ({"experts"}, None),
               "nextserve-redis": ({"Deployment/redis"}, redis_container["ports"][0]["name"])}
    for policy_name, (selected, port) in targets.items():
        spec = objs[("NetworkPolicy", policy_name)]["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        every_pod = ray_pods | others
        assert {pod for pod, labels in every_pod.items() if _selects(spec["podSelector"], labels)} == selected
        (rule,) = spec["ingress"]
        (source,) = rule["from"]
        assert set(source) == {"podSelector"}, "no namespaceSelector / ipBlock: only this namespace's Ray pods"
        admitted = {pod for pod, labels in every_pod.items() if _selects(source["podSelector"], labels)}
        assert admitted == set(ray_pods), f"{policy_name} admits {sorted(admitted)}"
        assert [p["port"] for p in rule.get("ports", [])] == ([] if port is None else [port])


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_redis_serves_the_registry_and_gcs_fault_tolerance(name: str) -> None:
    objs = by_key(rendered(name))
    service = objs[("RayService", "nextserve")]
    ft = service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    redis_service = objs[("Service", "redis")]
    port = redis_service["spec"]["ports"][0]["port"]
    assert ft["redisAddress"] == f"redis:{port}"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "nextserve-redis", "key": "password"}
    assert REGISTRY_REDIS_URL.startswith(f"redis://redis:{port}/")
    container = objs[("Deployment", "redis")]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "nextserve-redis", "key": "password"}


def test_gpu_overlay_gives_each_heads_and_experts_pod_one_gpu_and_persists_redis() -> None:
    objs = by_key(rendered("overlays/gpu"))
    service = objs[("RayService", "nextserve")]
    head_pod = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in head_pod["containers"][0]["resources"]["limits"]
    for group in _groups(service):
        pod = group["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert pod["nodeSelector"]["nextserve.io/pool"] == group["groupName"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    redis = objs[("Deployment", "redis")]["spec"]["template"]["spec"]
    claims = {name for kind, name in objs if kind == "PersistentVolumeClaim"}
    assert redis["volumes"][0]["persistentVolumeClaim"]["claimName"] in claims
    args = redis["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"


def test_dev_overlay_ships_its_secret_and_the_tiny_model_job() -> None:
    objs = by_key(rendered("overlays/dev"))
    assert ("Secret", "nextserve-redis") in objs
    job = objs[("Job", "nextserve-make-tiny")]["spec"]["template"]["spec"]
    assert "nextserve make-tiny" in job["containers"][0]["command"][-1]
    assert ("Secret", "nextserve-admin") in objs
    gpu = by_key(rendered("overlays/gpu"))
    assert ("Secret", "nextserve-redis") not in gpu and ("Secret", "nextserve-admin") not in gpu  # the operator's


def test_ingress_routes_to_the_rayservice_serve_service() -> None:
    ingress = by_key(rendered("components/ingress"))[("Ingress", "nextserve")]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "nextserve-serve-svc", "port": {"number": 8000}}


def test_checkpoint_jobs_write_where_the_serve_config_reads() -> None:
    download = by_key(rendered("overlays/gpu"))[("Job", "nextserve-download-checkpoint")]
    env = {e["name"]: e.get("value") for e in download["spec"]["template"]["spec"]["containers"][0]["env"]}
    service = by_key(rendered("overlays/gpu"))[("RayService", "nextserve")]
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert env["MODEL_DIR"] == args["model"]
    dev = by_key(rendered("overlays/dev"))
    dev_args = yaml.safe_load(dev[("RayService", "nextserve")]["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert f"mv /models/tiny.partial {dev_args['model']}" in \
        dev[("Job", "nextserve-make-tiny")]["spec"]["template"]["spec"]["containers"][0]["command"][-1]


def test_crd_files_are_the_published_ones() -> None:
    for kind in CRD_FILES:
        assert crd(kind)["spec"]["names"]["kind"] == kind and crd(kind)["spec"]["group"] == "ray.io"


def test_manifests_are_plain_files() -> None:
    assert all(p.suffix in (".yaml",) for p in K8S.rglob("*") if p.is_file()), "k8s/ holds manifests only"
    assert Path(K8S / "overlays" / "gpu" / "capacity-patch.yaml").exists()
