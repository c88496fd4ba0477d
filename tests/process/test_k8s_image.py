"""The container image's Dockerfile agrees with the manifests and the package: the Ray version the
RayService declares, every package pyproject.toml installs, a build context without the venv."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.specifiers import SpecifierSet

from test_k8s_render import K8S, KUSTOMIZATIONS, by_key, render

ROOT = K8S.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert match, f"Dockerfile has no ARG {name}=..."
    return match.group(1)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_image_ray_version_is_the_rayservice_ray_version(name: str) -> None:
    service = by_key(render(K8S / name))[("RayService", "nextserve")]
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == _arg("RAY_VERSION")


def test_image_is_a_ray_image_and_pyproject_admits_its_ray() -> None:
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-\$\{RAY_FLAVOR\}$", DOCKERFILE, re.MULTILINE)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ray_req = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray"))
    assert _arg("RAY_VERSION") in SpecifierSet(ray_req.split("]", 1)[1])
    torch_req = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    assert _arg("TORCH_VERSION") in SpecifierSet(torch_req.removeprefix("torch"))


def test_image_copies_every_package_pyproject_installs() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # Top-level folders of the `nextserve` package (the repository root, mapped with package-dir).
    packages = {p.split(".")[1] for p in pyproject["tool"]["setuptools"]["packages"] if p.count(".") >= 1}
    copied = set(re.findall(r"^COPY --chown=ray:users (\w+)/ \1/$", DOCKERFILE, re.MULTILINE))
    assert packages == copied
    assert all((ROOT / p / "__init__.py").exists() for p in packages)
    assert re.search(r"^COPY --chown=ray:users pyproject.toml README.md __init__.py \./$", DOCKERFILE, re.MULTILINE)
    assert "PYTHONPATH" not in DOCKERFILE and "pip install --no-cache-dir -e" not in DOCKERFILE


def test_build_context_leaves_out_the_venv_and_git() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", "tests"} <= ignored
    assert not {"model", "cluster", "pyproject.toml", "README.md"} & ignored
