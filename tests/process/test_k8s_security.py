"""The perimeter of every rendered kustomization (`kubectl kustomize` when kubectl is on PATH): every pod
template hardened (non-root, no privilege escalation, no capabilities, RuntimeDefault seccomp, a read-only
root with emptyDirs for what is written), every pod selected by a NetworkPolicy that admits outsiders
only to Serve's HTTP port, Ray's token authentication on (validated against KubeRay's CRD in
../shared/crds, skipped when absent), the Serve app's secrets only from Secrets, and an image whose USER
is numeric and not root."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest
import yaml

from test_k8s_manifests import _kuberay_pod_labels, _other_pod_labels, _selects, crd_schema, rendered
from test_k8s_render import K8S, KUSTOMIZATIONS, Resource, by_key

SERVE_PORT = 8000
RAY_AUTH_SECRET = "nextserve-ray-auth"


def pod_templates(objs: dict[tuple[str, str], Resource]) -> dict[str, dict[str, Any]]:
    """Every pod template the manifests make: the RayService's head and worker groups, Deployments, Jobs
    -> {name: the template (metadata + spec)}."""
    out: dict[str, dict[str, Any]] = {}
    for (kind, name), resource in objs.items():
        if kind in ("Deployment", "Job"):
            out[f"{kind}/{name}"] = resource["spec"]["template"]
        if kind == "RayService":
            cluster = resource["spec"]["rayClusterConfig"]
            out["headgroup"] = cluster["headGroupSpec"]["template"]
            out |= {group["groupName"]: group["template"] for group in cluster["workerGroupSpecs"]}
    return out


def hardening_problems(template: dict[str, Any]) -> list[str]:
    """What a pod template lacks of the hardening docs/KUBERNETES.md (Security) promises; [] when none."""
    spec, problems = template["spec"], []
    pod = spec.get("securityContext", {})
    if pod.get("runAsNonRoot") is not True:
        problems.append("pod: runAsNonRoot is not true")
    if pod.get("runAsUser", 1) == 0:
        problems.append("pod: runAsUser 0")
    if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("pod: seccompProfile is not RuntimeDefault")
    writable = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v or "persistentVolumeClaim" in v}
    secrets = {v["name"] for v in spec.get("volumes", []) if "secret" in v}  # a Secret as files: read-only only
    for container in spec.get("initContainers", []) + spec["containers"]:
        name, context = container["name"], container.get("securityContext", {})
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if "ALL" not in context.get("capabilities", {}).get("drop", []) or context["capabilities"].get("add"):
            problems.append(f"{name}: capabilities do not drop ALL (or add some)")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem is not true")
        if context.get("privileged") or context.get("runAsUser") == 0:
            problems.append(f"{name}: privileged or root")
        for mount in container.get("volumeMounts", []):
            if mount["name"] in secrets and mount.get("readOnly") is not True:
                problems.append(f"{name}: Secret mount {mount['name']} is not readOnly")
            elif mount["name"] not in writable | secrets:
                problems.append(f"{name}: mount {mount['name']} is neither an emptyDir, a PVC nor a read-only Secret")
    return problems


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_pod_template_is_hardened(name: str) -> None:
    templates = pod_templates(by_key(rendered(name)))
    assert {"headgroup", "heads", "experts", "Deployment/redis"} <= set(templates)
    assert name == "base" or any(t.startswith("Job/") for t in templates), "the overlay's checkpoint Job"
    problems = {pod: hardening_problems(t) for pod, t in templates.items()}
    assert not any(problems.values()), {pod: p for pod, p in problems.items() if p}
    for group in ("headgroup", "heads", "experts"):  # Ray writes its session under /tmp: an emptyDir there
        (container,) = templates[group]["spec"]["containers"]
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, group


def test_hardening_check_catches_what_it_checks() -> None:
    """The check above fails on a template missing each property (it cannot pass vacuously)."""
    template = pod_templates(by_key(rendered("overlays/dev")))["heads"]
    assert hardening_problems(template) == []
    for path, bad in [(("securityContext", "runAsNonRoot"), False),
                      (("securityContext", "seccompProfile"), {"type": "Unconfined"}),
                      (("containers", 0, "securityContext", "allowPrivilegeEscalation"), True),
                      (("containers", 0, "securityContext", "capabilities"), {"drop": ["NET_RAW"]}),
                      (("containers", 0, "securityContext", "readOnlyRootFilesystem"), False)]:
        broken = yaml.safe_load(yaml.safe_dump(template))
        node = broken["spec"]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = bad
        assert hardening_problems(broken), path
    writable_secret = yaml.safe_load(yaml.safe_dump(template))
    for mount in writable_secret["spec"]["containers"][0]["volumeMounts"]:
        if mount["name"] == "api-keys":
            mount["readOnly"] = False
    assert hardening_problems(writable_secret) == ["ray-worker: Secret mount api-keys is not readOnly"]


def test_autoscaler_sidecar_is_hardened() -> None:
    for name in KUSTOMIZATIONS:
        service = by_key(rendered(name))[("RayService", "nextserve")]
        context = service["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]


def _policies(objs: dict[tuple[str, str], Resource]) -> list[dict[str, Any]]:
    return [r["spec"] for (kind, _), r in objs.items() if kind == "NetworkPolicy"]


def _open_ports(policy: dict[str, Any], labels: dict[str, str], ray_pods: dict[str, dict[str, str]]) -> set[Any]:
    """Ports `policy` opens to a pod with `labels` outside this app's Ray pods ('*' for every port)."""
    ports: set[Any] = set()
    for rule in policy.get("ingress", []):
        sources = rule.get("from")
        admitted = sources is None or any(
            set(s) == {"podSelector"} and _selects(s["podSelector"], labels) or "ipBlock" in s
            or (set(s) == {"namespaceSelector"}) for s in sources)
        if admitted:
            ports |= {p["port"] for p in rule.get("ports", [])} or {"*"}
    return ports


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_pod_is_selected_by_a_network_policy(name: str) -> None:
    objs = by_key(rendered(name))
    ray_pods = _kuberay_pod_labels(objs[("RayService", "nextserve")])
    pods = ray_pods | _other_pod_labels(objs)
    policies = _policies(objs)
    for policy in policies:
        assert policy["policyTypes"] == ["Ingress"]
    unselected = [pod for pod, labels in pods.items() if not any(_selects(p["podSelector"], labels) for p in policies)]
    assert unselected == []
    # An outsider (a pod of another app in the namespace) reaches Serve's HTTP port on the Ray head and
    # the heads pods, and nothing else of any pod: not GCS, the dashboard, the agents, the workers, Redis.
    outsider = {"app.kubernetes.io/name": "other-app"}
    for pod, labels in pods.items():
        open_ports = set().union(*(_open_ports(p, outsider, ray_pods) for p in policies
                                   if _selects(p["podSelector"], labels)))
        assert open_ports == ({SERVE_PORT} if pod in ("headgroup", "heads") else set()), (pod, open_ports)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_ray_head_dashboard_admits_the_kuberay_operator_only(name: str) -> None:
    """KubeRay reads Serve's status and submits serveConfigV2 on the head's dashboard (8265)."""
    objs = by_key(rendered(name))
    head = objs[("NetworkPolicy", "nextserve-ray-head")]["spec"]
    operator_rules = [r for r in head["ingress"] if any("namespaceSelector" in s for s in r.get("from", []))]
    assert len(operator_rules) == 1
    (source,) = operator_rules[0]["from"]
    assert source["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
    assert [p["port"] for p in operator_rules[0]["ports"]] == [8265]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_ray_token_authentication_is_on(name: str) -> None:
    objs = by_key(rendered(name))
    cluster = objs[("RayService", "nextserve")]["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": RAY_AUTH_SECRET}
    schema = crd_schema("RayService")["properties"]["spec"]["properties"]["rayClusterConfig"]["properties"]
    jsonschema.validate(cluster["authOptions"], schema["authOptions"], cls=jsonschema.Draft7Validator)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"mode": "on"}, schema["authOptions"], cls=jsonschema.Draft7Validator)
    if name == "overlays/dev":  # the gpu overlay expects the operator to create it (its kustomization says how)
        secret = objs[("Secret", RAY_AUTH_SECRET)]
        assert set(secret["stringData"]) == {"auth_token"}  # the key KubeRay reads


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_serve_app_reads_its_secrets_from_secrets_only(name: str) -> None:
    service = by_key(rendered(name))[("RayService", "nextserve")]
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert "admin_token" not in args and "api_key" not in args
    assert "@" not in args["redis_url"], "no password in the Serve config: redis_password_env names it"
    assert args["redis_password_env"] and args["admin_token_env"]
    cluster = service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        for variable in (args["redis_password_env"], args["admin_token_env"]):
            assert "secretKeyRef" in env[variable]["valueFrom"] and "value" not in env[variable]


def test_image_user_is_numeric_and_not_root() -> None:
    users = re.findall(r"^USER\s+(\S+)", (K8S.parent / "Dockerfile").read_text(), re.MULTILINE)
    assert users, "the Dockerfile sets no USER: runAsNonRoot needs a numeric non-root one"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit())
    for name in KUSTOMIZATIONS:
        for pod, template in pod_templates(by_key(rendered(name))).items():
            if template["spec"]["containers"][0]["image"].startswith(("nextserve", "registry.example.com")):
                assert template["spec"]["securityContext"]["runAsUser"] == int(uid), (name, pod)
