"""The package's layers keep to what their folders say they may import."""

import ast
import pathlib
import subprocess
import sys

import pytest


PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "src" / "diffrax_deer"


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args, "-c", code] if code else [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["_core", "_methods"])
def test_pure_jax_layers_import_without_diffrax(layer):
    # Block diffrax, and load the layer without running the package's __init__
    # (which would reach the diffrax adapter on first use anyway).
    code = f"""
import importlib, pathlib, sys, types
sys.modules["diffrax"] = None  # `import diffrax` now raises ImportError
package = types.ModuleType("diffrax_deer")
package.__path__ = [{str(PACKAGE)!r}]
sys.modules["diffrax_deer"] = package
for path in sorted(pathlib.Path({str(PACKAGE / layer)!r}).rglob("*.py")):
    parts = path.relative_to({str(PACKAGE.parent)!r}).with_suffix("").parts
    importlib.import_module(".".join(p for p in parts if p != "__init__"))
assert sys.modules["diffrax"] is None, "diffrax was imported"
print("ok")
"""
    process = _run(code)
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip() == "ok"


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", ["_core", "_methods"])
def test_pure_jax_layers_never_name_diffrax(layer):
    # Also imports inside functions, which an import test does not run.
    for path in (PACKAGE / layer).rglob("*.py"):
        roots = {name.split(".")[0] for name in _imported_modules(path)}
        assert "diffrax" not in roots, path


def test_core_imports_nothing_else_of_the_package():
    core = PACKAGE / "_core"
    for path in core.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                # `.` is the file's own folder, `..` the one above, ...
                target = path.parents[node.level - 1]
                if not target.is_relative_to(core):
                    pytest.fail(f"{path} imports from outside the core: {node.module}")


@pytest.mark.slow
def test_import_loads_neither_jax_nor_the_command_line():
    code = """
import sys
import diffrax_deer
assert "jax" not in sys.modules, "import diffrax_deer imported JAX"
from diffrax_deer import DeerSolver  # noqa: F401
assert not any(m.startswith(("diffrax_deer._cli", "diffrax_deer._bench"))
               for m in sys.modules), sorted(m for m in sys.modules if "_cli" in m)
print("ok")
"""
    process = _run(code)
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip() == "ok"


def test_help_answers_without_importing_jax():
    process = _run("", "-X", "importtime", "-m", "diffrax_deer", "--help")
    assert process.returncode == 0, process.stderr
    assert "usage: diffrax-deer" in process.stdout
    imported = {line.split("|")[-1].strip() for line in process.stderr.splitlines()}
    assert "jax" not in imported and "numpy" not in imported


def test_public_names_resolve_and_match_the_static_imports():
    import diffrax_deer

    for name in diffrax_deer.__all__:
        assert getattr(diffrax_deer, name) is not None
    # The `TYPE_CHECKING` imports (what docs and type checkers read) name the same
    # objects from the same modules as the run-time table.
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    static = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for alias in node.names:
                static[alias.asname or alias.name] = "." + node.module
    assert static == diffrax_deer._EXPORTS


# Optional: `--plot` (documented as needing it, imported only when asked).
OPTIONAL_IMPORTS = {"matplotlib"}


def test_every_imported_package_is_a_runtime_dependency():
    # A plain `pip install diffrax-deer` must run every method: sympy (the
    # collocation tableaux) was once only in the `dev` extra.
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())
    declared = {
        requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].strip()
        for requirement in project["project"]["dependencies"]
    }
    imported = set()
    for path in PACKAGE.rglob("*.py"):
        imported |= {name.split(".")[0] for name in _imported_modules(path)}
    third_party = imported - set(sys.stdlib_module_names) - {"diffrax_deer"}
    assert third_party - OPTIONAL_IMPORTS <= declared, third_party - declared


def test_no_function_is_longer_than_120_lines():
    # "Keep functions short": a hard ceiling, docstrings included.
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 120:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {length}")
    assert not long, long
