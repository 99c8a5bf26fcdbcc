"""The notebooks run from top to bottom (in quick mode) without error.

`DEER_NOTEBOOK_QUICK=1` shrinks its grids and its lists of systems and methods (and
the GRU notebook's sequences and training steps); the notebooks' own asserts
(convergence orders, DEER(Tsit5) equal to sequential Tsit5, deer_scan's losses
equal to lax.scan's) still run. The committed copy is not modified.
"""

import importlib.util
import pathlib

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "validate_against_tsit5.ipynb"
TRAINING_NOTEBOOK = ROOT / "notebooks" / "fit_neural_ode.ipynb"
GRU_NOTEBOOK = ROOT / "notebooks" / "train_gru.ipynb"
MISSING = [
    name
    for name in ("nbformat", "nbclient", "ipykernel", "matplotlib")
    if importlib.util.find_spec(name) is None
]
MISSING_TRAINING = MISSING + (
    ["optax"] if importlib.util.find_spec("optax") is None else []
)


def run_in_quick_mode(path, monkeypatch):
    """Executes a copy of the notebook at `path` with `DEER_NOTEBOOK_QUICK=1`;
    returns its printed text and its number of images, having checked no cell
    failed."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("DEER_NOTEBOOK_QUICK", "1")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError, with the traceback, on failure
    outputs = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    ]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs)
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    return text, len(images)


@pytest.mark.slow
@pytest.mark.skipif(
    bool(MISSING),
    reason=f'{", ".join(MISSING)} not installed (pip install -e ".[dev]")',
)
def test_validation_notebook_runs_in_quick_mode(monkeypatch):
    text, num_images = run_in_quick_mode(NOTEBOOK, monkeypatch)
    assert "quick mode: True" in text
    assert num_images >= 3  # trajectories, convergence orders, Newton residuals


# The training notebooks, each with a line its quick run must print (besides the
# quick-mode banner) and its number of figures.
TRAINING_NOTEBOOKS = {
    # A few NeuralODE training steps, DEER and Tsit5: loss curves and step times,
    # Newton iterations, fits.
    "fit_neural_ode": (TRAINING_NOTEBOOK, "quick mode: True", 2),
    # A few GRU training steps, deer_scan and lax.scan: the data; loss, step times
    # and Newton iterations. The notebook asserts the losses agree and prints it.
    "train_gru": (GRU_NOTEBOOK, "largest difference of a deer_scan loss", 2),
}


@pytest.mark.slow
@pytest.mark.skipif(
    bool(MISSING_TRAINING),
    reason=f'{", ".join(MISSING_TRAINING)} not installed (pip install -e ".[dev]")',
)
@pytest.mark.parametrize("name", list(TRAINING_NOTEBOOKS))
def test_training_notebook_runs_in_quick_mode(monkeypatch, name):
    path, expected_line, min_images = TRAINING_NOTEBOOKS[name]
    text, num_images = run_in_quick_mode(path, monkeypatch)
    assert "quick mode: True" in text
    assert expected_line in text
    assert num_images >= min_images
