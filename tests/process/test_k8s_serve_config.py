"""The Serve application as each rendered serveConfigV2 names it: the config passes Ray Serve's own
schema, its import_path resolves, and calling it with its args (the model path swapped for the tiny
checkpoint, as the PVC is not here) builds a `ray.serve.Application` — without starting Ray.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from nextserve.cluster.app_args import AppArgs
from nextserve.cluster.cli.field_flags import field_values
from nextserve.cluster.cli.main import build_parser
from nextserve.cluster.cli.k8s_overlay import ADMIN_TOKEN_ENV, REDIS_PASSWORD_ENV, REGISTRY_REDIS_URL
from test_k8s_render import K8S, KUSTOMIZATIONS, by_key, render



def serve_config(name: str) -> dict[str, Any]:
    service = by_key(render(K8S / name))[("RayService", "nextserve")]
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def resolve(import_path: str) -> Any:
    """As Serve resolves an import_path: `module:attr`, or `module.attr`."""
    module, _, attr = import_path.partition(":") if ":" in import_path else import_path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def buildable_args(args: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    return {**args, "model": str(model_dir)}  # AppArgs' extra="forbid" checks every other argument


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_serve_config_builds_the_application(name: str, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REDIS_PASSWORD_ENV, "test-password")  # what the pods get from the Secrets
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "test-admin-token")
    config = ServeDeploySchema.model_validate(serve_config(name))
    (app,) = config.applications
    assert app.import_path == "nextserve.cluster.app:build_app" and app.route_prefix == "/"
    assert app.args["model"].startswith("/models/")
    assert app.args["redis_url"] == REGISTRY_REDIS_URL
    built = resolve(app.import_path)(buildable_args(app.args, tiny_dir))
    assert isinstance(built, Application)
    assert not ray.is_initialized(), "building the application must not need a running Ray"
    monkeypatch.delenv(ADMIN_TOKEN_ENV)  # a pod without the Secret: a clear error at deploy time, not open workers
    with pytest.raises(ValueError, match=f"admin_token_env='{ADMIN_TOKEN_ENV}' is not set"):
        resolve(app.import_path)(buildable_args(app.args, tiny_dir))


def test_serve_args_are_all_app_args() -> None:
    for name in KUSTOMIZATIONS:
        args = serve_config(name)["applications"][0]["args"]
        assert set(args) <= set(AppArgs.model_fields), name


def _as_flags(args: dict[str, Any]) -> list[str]:
    """serveConfigV2 args as `nextserve up` flags: the same names, underscores as dashes."""
    argv = []
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return argv


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_serve_args_are_up_flags_of_the_same_names(name: str, tiny_dir: Path) -> None:
    """No mapping between a RayService's args and `nextserve up`: each arg, given as the flag of its
    name, makes the same AppArgs."""
    args = buildable_args(serve_config(name)["applications"][0]["args"], tiny_dir)
    given = field_values(build_parser().parse_args(["up", *_as_flags(args)]), AppArgs)
    assert given == {k: v for k, v in AppArgs(**args).model_dump().items() if k in args}
    assert AppArgs(**given) == AppArgs(**args)


def test_resolve_follows_serve_import_path_forms() -> None:
    assert resolve("nextserve.cluster.app:build_app") is resolve("nextserve.cluster.app.build_app")
    with pytest.raises(AttributeError):
        resolve("cluster.app:no_such_builder")
