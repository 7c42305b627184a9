"""The package and the image recipe: what a server installs, pinned the same way everywhere."""

import ast
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()


def requirements(extra: str | None = None) -> dict[str, Requirement]:
    listed = PROJECT["project"]["dependencies"] if extra is None else PROJECT["project"]["optional-dependencies"][extra]
    return {r.name.lower(): r for r in map(Requirement, listed)}


def pins() -> dict[str, str]:
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    return {name.lower().replace("_", "-"): version for name, version in (line.split("==") for line in lines)}


def test_only_the_service_packages_are_installed_at_the_top_level():
    include = PROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    top_level = {name.split(".")[0] for name in find_packages(where=ROOT, include=include)}
    assert top_level == {"twostage", "recall_server", "rerank_server", "gateway"}


def test_servers_install_one_onnxruntime_and_no_plotting():
    core = requirements()
    assert not {"onnxruntime", "onnxruntime-gpu", "matplotlib", "torch"} & set(core)
    assert set(requirements("cpu")) == {"onnxruntime"}
    assert set(requirements("gpu")) == {"onnxruntime-gpu"}  # never beside onnxruntime: they clash


def test_the_generated_stubs_runtime_is_required():
    generated = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'",
                          (ROOT / "twostage" / "v1" / "gateway_pb2_grpc.py").read_text()).group(1)
    for name in ("grpcio", "grpcio-health-checking", "grpcio-reflection"):
        assert not requirements()[name].specifier.contains("1.85.0"), name
        assert requirements()[name].specifier.contains(generated), name


def test_constraints_pin_every_dependency_within_its_range():
    pinned = pins()
    for extra in (None, "cpu", "gpu", "plots", "dev"):
        for name, requirement in requirements(extra).items():
            if name == "twostage":
                continue
            assert name in pinned, f"{name} is not in constraints.txt"
            assert requirement.specifier.contains(pinned[name], prereleases=True), (name, pinned[name])
    assert "torch" not in pinned  # its build differs per machine (TORCH_SPEC)


def test_make_and_the_image_install_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert "PIP_INSTALL := $(PY) -m pip install --quiet -c constraints.txt" in makefile
    installs = [line for line in makefile.splitlines() if "pip install" in line and "venv-" not in line]
    assert all("PIP_INSTALL" in line or "--upgrade pip" in line or line.startswith("PIP_INSTALL") for line in installs)
    assert "pip install -c constraints.txt -r requirements.txt" in DOCKERFILE


def stages() -> dict[str, str]:
    """Each stage's instructions, by stage name."""
    parts = re.split(r"^FROM \S+ AS (\w+)\n", DOCKERFILE, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_the_image_is_multi_stage_with_a_pinned_base_and_code_copied_last():
    assert re.search(r"^ARG BASE=python:3\.11\.\d+-slim-\w+$", DOCKERFILE, flags=re.MULTILINE)  # an exact release
    steps = stages()
    assert list(steps) == ["base", "deps", "models", "runtime"]
    deps = steps["deps"]
    copied = re.findall(r"^COPY (.+) \./$", deps, flags=re.MULTILINE)
    assert copied == ["pyproject.toml constraints.txt"]  # dependencies do not wait on the code
    assert "ARG EXTRAS=cpu" in deps
    runtime = steps["runtime"]
    assert runtime.index("COPY --from=deps") < runtime.index("COPY twostage twostage")
    assert re.search(r"pip install --no-deps \.", runtime)
    assert re.search(r"^USER 10001$", runtime, flags=re.MULTILINE)


def _imports_of(module: Path) -> set[str]:
    tree = ast.parse(module.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("twostage"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("twostage"))
    return found


def test_the_models_layer_copies_every_module_fetching_needs():
    copied = set(re.search(r"^COPY (twostage/\S+(?: twostage/\S+)*) twostage/$", stages()["models"],
                           flags=re.MULTILINE).group(1).split())
    needed, todo = set(), ["twostage.model_store"]
    while todo:
        module = todo.pop()
        path = f"{module.replace('.', '/')}.py"
        if path in needed:
            continue
        needed.add(path)
        todo.extend(_imports_of(ROOT / path))
    assert needed | {"twostage/__init__.py"} <= copied
