"""Rendering k8s/ kustomizations: `kubectl kustomize` when kubectl is on PATH, else a small renderer
for the subset of kustomize that k8s/ uses (resources, components, JSON 6902 patches with a kind/name
target, images). The tests here keep that subset honest: every kustomization renders the same both ways.
Other k8s tests import `render`, `KUSTOMIZATIONS` and `K8S` from here.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"
KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/gpu"]
Resource = dict[str, Any]


def _load_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def apply_json6902(doc: Resource, ops: list[dict[str, Any]]) -> None:
    """RFC 6902 add / replace / remove (what k8s/ patches use), in place."""
    for op in ops:
        *parents, last = [_unescape(t) for t in op["path"].lstrip("/").split("/")]
        node: Any = doc
        for token in parents:
            node = node[int(token)] if isinstance(node, list) else node[token]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if op["op"] == "add":
                node.insert(index, copy.deepcopy(op["value"]))
            elif op["op"] == "replace":
                node[index] = copy.deepcopy(op["value"])
            else:
                del node[index]
            continue
        if op["op"] in ("replace", "remove") and last not in node:
            raise KeyError(f"{op['op']} {op['path']}: no such field")
        if op["op"] == "remove":
            del node[last]
        else:
            node[last] = copy.deepcopy(op["value"])


def _set_images(node: Any, images: list[dict[str, str]]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    for image in images:
                        if container.get("image", "").split(":")[0] == image["name"]:
                            name = image.get("newName", image["name"])
                            container["image"] = f"{name}:{image['newTag']}" if "newTag" in image else name
            _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def render_lite(directory: Path, into: list[Resource] | None = None) -> list[Resource]:
    """Kustomize's order: resources, then components (which patch what came before), then own patches, images."""
    spec = _load_docs(directory / "kustomization.yaml")[0]
    out = [] if into is None else into
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            out.extend(render_lite(path))
        else:
            out.extend(_load_docs(path))
    for component in spec.get("components", []):
        render_lite(directory / component, into=out)
    for patch in spec.get("patches", []):
        ops = _load_docs(directory / patch["path"])[0]
        assert isinstance(ops, list), f"{patch['path']}: only JSON 6902 patches are supported here"
        target = patch["target"]
        matches = [r for r in out if r["kind"] == target["kind"] and r["metadata"]["name"] == target["name"]]
        assert matches, f"patch {patch['path']} targets {target}, which is not rendered"
        for resource in matches:
            apply_json6902(resource, ops)
    _set_images(out, spec.get("images", []))
    return out


def render_kubectl(directory: Path) -> list[Resource]:
    """`kubectl kustomize DIR`, run once per directory in a session (k8s/ does not change during one);
    each call gets its own copy of the objects to read or change."""
    return _load_docs_text(_kustomize_output(directory.resolve()))


@cache
def _kustomize_output(directory: Path) -> str:
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _load_docs_text(text: str) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def render(directory: Path) -> list[Resource]:
    return render_kubectl(directory) if shutil.which("kubectl") else render_lite(directory)


def by_key(resources: list[Resource]) -> dict[tuple[str, str], Resource]:
    return {(r["kind"], r["metadata"]["name"]): r for r in resources}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_lite_render_matches_kubectl(name: str) -> None:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not on PATH: the k8s tests use the built-in renderer")
    assert by_key(render_lite(K8S / name)) == by_key(render_kubectl(K8S / name))


def test_json6902_ops_follow_the_rfc() -> None:
    doc: Resource = {"a": {"b/c": 1, "list": [1, 2]}}
    apply_json6902(doc, [{"op": "add", "path": "/a/list/-", "value": 3},
                         {"op": "replace", "path": "/a/b~1c", "value": 2},
                         {"op": "add", "path": "/a/new", "value": {"x": 1}},
                         {"op": "remove", "path": "/a/list/0"}])
    assert doc == {"a": {"b/c": 2, "list": [2, 3], "new": {"x": 1}}}
    with pytest.raises(KeyError, match="no such field"):
        apply_json6902(doc, [{"op": "replace", "path": "/a/missing", "value": 0}])
