"""The documentation site builds with `mkdocs build --strict` (no broken links,
no missing API objects, no unresolved cross-references)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None
    or importlib.util.find_spec("mkdocstrings") is None
    or importlib.util.find_spec("material") is None,
    reason="mkdocs, mkdocs-material or mkdocstrings is not installed "
    '(pip install -e ".[dev]")',
)
def test_mkdocs_build_strict(tmp_path):
    if not (ROOT / "mkdocs.yml").exists():
        pytest.skip("no mkdocs.yml: not running from a source checkout")
    site = tmp_path / "site"
    process = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert process.returncode == 0, process.stdout + process.stderr
    for page in ("index.html", "api/solver/index.html", "benchmarks/index.html"):
        assert (site / page).exists(), page
    api = (site / "api" / "solver" / "index.html").read_text()
    assert "diffrax_deer.DeerSolver" in api and "num_steps" in api
