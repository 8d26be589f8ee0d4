"""The container image holds what the agent imports and nothing else (docs/image.md).

Cheap and without docker, so CI runs them: the runtime dependencies declared in pyproject are the
third-party packages agent/ imports, and the Dockerfile's runtime stage gets the agent's venv with
neither the build tools nor the dev extras. The image itself is built and measured with
`make image`, `make image-smoke` and `python -m tests.image_imports --image` (docker).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "agent"
DOCKERFILE = REPO / "Dockerfile"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_dependencies() -> set[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {canonical(Requirement(r).name) for r in pyproject["project"]["dependencies"]}


def top_level_imports(root: Path) -> dict[str, set[str]]:
    """Absolute imports' first names in every module below ``root``: name -> importing files."""
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(root)))
    return found


def third_party_imports() -> dict[str, set[str]]:
    return {
        name: files
        for name, files in top_level_imports(AGENT).items()
        if name not in sys.stdlib_module_names and name != "agent"
    }


def owners() -> dict[str, set[str]]:
    """Top-level module name -> the installed distributions that provide it."""
    return {
        name: {canonical(d) for d in dists} for name, dists in md.packages_distributions().items()
    }


def test_the_import_scan_sees_every_form_of_import(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(
        "import os, yaml\nfrom grpc import aio\nfrom . import sibling\n"
        "def f():\n    import cryptography.x509\n    from google.protobuf import message\n"
    )
    found = top_level_imports(tmp_path)
    assert set(found) == {"os", "yaml", "grpc", "cryptography", "google"}


def test_every_third_party_import_in_agent_is_a_declared_runtime_dependency() -> None:
    """A package the agent imports only through another's dependencies breaks when that other
    package goes (as `kubernetes` pulled in urllib3): the image installs what pyproject lists."""
    declared = declared_dependencies()
    provided = owners()
    undeclared = {
        name: sorted(files)
        for name, files in third_party_imports().items()
        if not provided.get(name, set()) & declared
    }
    assert not undeclared, f"imported by agent/ but not in pyproject's dependencies: {undeclared}"


def test_every_declared_runtime_dependency_is_imported_by_the_agent() -> None:
    """What the agent never imports does not belong in the image."""
    imported = set(third_party_imports())
    provided = owners()
    unused = sorted(
        dist
        for dist in declared_dependencies()
        if not {name for name, dists in provided.items() if dist in dists} & imported
    )
    assert not unused, f"declared in pyproject but imported by no module in agent/: {unused}"


def stages(text: str) -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined), one list per stage."""
    joined = re.sub(r"\\\n", " ", text)
    lines = [line.strip() for line in joined.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    result: list[list[str]] = []
    for line in lines:
        if line.startswith("FROM "):
            result.append([])
        if result:
            result[-1].append(line)
    return result


def test_the_runtime_stage_gets_the_agents_venv_and_nothing_else() -> None:
    text = DOCKERFILE.read_text()
    builder, runtime = stages(text)
    assert runtime[0] == "FROM ${PYTHON_IMAGE}"
    copies = [line for line in runtime if line.startswith(("COPY", "ADD"))]
    assert copies == ["COPY --from=builder /opt/cert-agent /opt/cert-agent"]
    assert not [line for line in runtime if line.startswith("RUN ")]
    # The build tools live in /opt/tools; the agent's venv is made without pip and setuptools.
    run = " ".join(line for line in builder if line.startswith("RUN "))
    assert "python3 -m venv --without-pip /opt/cert-agent" in run
    assert "/opt/tools/bin/pip install" in run and "/opt/cert-agent/bin/pip" not in run
    assert "--python /opt/cert-agent/bin/python install" in run
    # The wheel alone: no extras (dev tools, test tools) and no editable or source install.
    installs = [
        found
        for line in builder
        if line.startswith("RUN ")
        for found in re.findall(r"--python /opt/cert-agent/bin/python install (.*?)(?:&&|$)", line)
    ]
    assert len(installs) == 1
    assert installs[0].split()[-1] == "/dist/*.whl", installs
    assert "[" not in installs[0] and " -e " not in installs[0]
    assert "[dev]" not in text and ".[" not in text


def test_the_builder_stage_compiles_bytecode_and_drops_what_never_runs() -> None:
    builder = " ".join(stages(DOCKERFILE.read_text())[0])
    assert "-name tests -exec rm -rf" in builder
    for pattern in ("'*.pyi'", "'*.h'", "'*.c'"):
        assert pattern in builder
    # Dependencies as sourceless bytecode, the agent with its sources and a hash-checked .pyc.
    assert "compileall -q -j 0 -b -x '/site-packages/agent/'" in builder
    assert "-name '*.py' -not -path './agent/*' -delete" in builder
    assert "--invalidation-mode unchecked-hash" in builder


def test_the_builder_defaults_to_the_runtime_base() -> None:
    """One Python in both stages: the venv's interpreter link must resolve in the runtime."""
    lines = DOCKERFILE.read_text().splitlines()
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in lines
    assert "ARG BUILDER_IMAGE=${PYTHON_IMAGE}" in lines
    assert "FROM ${BUILDER_IMAGE} AS builder" in lines


def test_the_image_scripts_parse() -> None:
    for script, shell in (("make-base.sh", "sh"), ("smoke-test.sh", "bash")):
        path = REPO / "deploy" / "image" / script
        result = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert path.stat().st_mode & 0o111, f"{script} is not executable"
    base = (REPO / "deploy" / "image" / "make-base.sh").read_text()
    assert "--variant=minbase" in base


def test_the_agent_never_uses_pyyamls_libyaml_binding() -> None:
    """The image drops yaml/_yaml*.so: the agent must parse with the pure-Python loaders."""
    c_names = re.compile(r"\bC(?:Safe|Full|Unsafe)?(?:Loader|Dumper|Parser|Emitter)\b|_yaml\b")
    users = [
        str(path.relative_to(REPO))
        for path in sorted(AGENT.rglob("*.py"))
        if "yaml" in path.read_text() and c_names.search(path.read_text())
    ]
    assert not users, users
    builder = " ".join(stages(DOCKERFILE.read_text())[0])
    assert "rm yaml/_yaml.cpython-*.so" in builder
