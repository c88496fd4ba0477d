"""The package's shape: one import namespace (`nextserve.*`, installable as a plain wheel beside
proto-plus's top-level `proto`), and imports that flow one way (cli -> deployments -> control / engine /
gateway -> router / experts -> model), with no arrow from the product to bench/."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".venv", "build", "tests", ".git", "docs", "k8s", ".ci"}


def _package_dirs() -> set[str]:
    found = {"nextserve"}
    for init in REPO.rglob("__init__.py"):
        rel = init.parent.relative_to(REPO)
        if rel.parts and rel.parts[0] not in SKIP_DIRS and not any(p.startswith(".") for p in rel.parts):
            found.add("nextserve." + ".".join(rel.parts))
    return found


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_pyproject_lists_every_package_folder() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert listed == _package_dirs()


def test_model_imports_nothing_above_it() -> None:
    for path in (REPO / "model").rglob("*.py"):
        bad = {m for m in _imported_modules(path) if m.split(".")[:2] in (["nextserve", "cluster"],
               ["nextserve", "router"], ["nextserve", "experts"])}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}: model/ must not depend on them"


def test_gateway_imports_the_engine_only_through_its_contract() -> None:
    """One engine contract (cluster/engine/contract.py): the gateway sees no other engine module."""
    for path in (REPO / "cluster" / "gateway").rglob("*.py"):
        engine = {m for m in _imported_modules(path) if m.startswith("nextserve.cluster.engine")}
        assert engine <= {"nextserve.cluster.engine.contract"}, f"{path.relative_to(REPO)} imports {sorted(engine)}"


def _product_files(folder: str) -> list[Path]:
    return [p for p in (REPO / folder).rglob("*.py") if not any(part.startswith(".") for part in p.parts)]


def _imports_under(path: Path, *packages: str) -> set[str]:
    """What `path` imports (at any depth of the file, top level or in a function) from `packages`."""
    return {m for m in _imported_modules(path) for pkg in packages if m == pkg or m.startswith(pkg + ".")}


def test_router_and_experts_import_no_cluster_and_no_ray() -> None:
    """router/ and experts/ are the data plane, tested without a cluster: what they need of the control
    plane (the published placement) is handed in (router/epoch_follower.py's PlacementSource)."""
    for folder in ("router", "experts"):
        for path in _product_files(folder):
            bad = _imports_under(path, "nextserve.cluster", "nextserve.bench", "ray")
            assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}: {folder}/ runs without Ray or cluster/"


def test_experts_do_not_import_router() -> None:
    for path in _product_files("experts"):
        bad = _imports_under(path, "nextserve.router")
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}: a worker is told its pairs, not a placement"


def test_product_never_imports_bench() -> None:
    """bench/ uses the product; the product does not use bench/ (the CLI imports a bench by name, with
    importlib, only when `nextserve bench NAME` runs)."""
    for folder in ("model", "router", "experts", "proto", "cluster"):
        for path in _product_files(folder):
            bad = _imports_under(path, "nextserve.bench")
            assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}: the product must not import bench/"


def test_cli_module_does_not_load_bench() -> None:
    """Importing the CLI and building its parser loads no bench/, no Ray, no transformers and no command's
    implementation (cluster/cli/lazy_command.py): each is imported when its command runs."""
    code = ("import sys\nimport nextserve.cluster.cli.main as cli\ncli.build_parser()\n"
            "bad = ('nextserve.bench', 'ray', 'transformers', 'nextserve.cluster.cli.generate', "
            "'nextserve.cluster.cli.cluster_commands', 'nextserve.cluster.cli.up', 'nextserve.model.tiny')\n"
            "loaded = sorted(m for m in sys.modules if m in bad or m.startswith(tuple(b + '.' for b in bad)))\n"
            "assert not loaded, loaded\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"importing the CLI imported what only a command needs:\n{done.stderr[-2000:]}"


def test_registry_commands_load_no_serve_and_no_transformers() -> None:
    """`status`, `scale` and `rebalance` (cluster/cli/cluster_commands.py) talk to Redis only: their module
    imports neither Ray Serve, the app, nor transformers (what `up`'s module imports), so a status call is not
    seconds of imports."""
    code = ("import sys\nimport nextserve.cluster.cli.cluster_commands\n"
            "bad = ('ray.serve', 'transformers', 'nextserve.cluster.app', 'nextserve.cluster.cli.up')\n"
            "loaded = sorted(m for m in sys.modules if m in bad or m.startswith(tuple(b + '.' for b in bad)))\n"
            "assert not loaded, loaded\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the registry commands imported what only `up` needs:\n{done.stderr[-2000:]}"


def test_every_bench_the_cli_names_defines_that_sub_command() -> None:
    """The CLI's registry of benches (name -> module) and the modules agree: each module adds a parser
    under its registry name and has a `run`."""
    import argparse

    from nextserve.cluster.cli.main import BENCHES

    assert {p.stem for p in (REPO / "bench").glob("*.py")} >= {b.module.rsplit(".", 1)[1] for b in BENCHES.values()}
    for name, bench in BENCHES.items():
        module = importlib.import_module(bench.module)
        sub = argparse.ArgumentParser().add_subparsers(dest="bench")
        module.add_parser(sub)
        assert list(sub.choices) == [name], (bench.module, list(sub.choices))
        assert callable(module.run), bench.module


def test_engine_and_gateway_never_import_ray() -> None:
    modules = [f"nextserve.cluster.{pkg}." + ".".join(p.relative_to(REPO / "cluster" / pkg).with_suffix("").parts)
               for pkg in ("engine", "gateway") for p in (REPO / "cluster" / pkg).rglob("*.py")
               if p.name != "__init__.py"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
            "assert not bad, bad[:5]\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"cluster/engine or cluster/gateway pulled in ray:\n{done.stderr[-2000:]}"


def test_wheel_installs_beside_proto_plus_and_every_module_imports(tmp_path: Path) -> None:
    """A plain (non-editable) wheel: every module imports from the installed copy, and a top-level
    `proto` (proto-plus, which Ray's dependencies install) stays what it is."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, timeout=300, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("nextserve-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert all(n.startswith(("nextserve/", "nextserve-")) for n in names), [n for n in names if "/" not in n][:5]
    modules = sorted(n[:-3].replace("/", ".").removesuffix(".__init__") for n in names
                     if n.endswith(".py") and not n.endswith("__main__.py"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    if importlib.util.find_spec("proto") is None:  # proto-plus comes with Ray's dependencies; else a stand-in
        (site / "proto").mkdir()
        (site / "proto" / "__init__.py").write_text("Message = object\n")
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            f"    mod = importlib.import_module(m)\n"
            f"    assert mod.__file__.startswith({str(site)!r}), (m, mod.__file__)\n"
            "import proto\nassert hasattr(proto, 'Message'), proto.__file__  # proto-plus's, not ours\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(modules) > 60
