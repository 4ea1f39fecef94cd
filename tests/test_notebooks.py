"""Every tutorial notebook runs top to bottom in a fresh kernel (and asserts its numbers)."""

import glob
import json
import os
import sys

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from tests.conftest import ROOT

NOTEBOOKS = os.path.join(ROOT, "notebooks")
NAMES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOKS, "*.ipynb")))
KEY_NUMBERS = {
    "01_backpropagation.ipynb": ["-2.0"],
    "02_chain_rule.ipynb": ["dloss/dw = -2.0"],
    "03_implementing_backpropagation.ipynb": [
        "Gradient of w1: -9.0000",
        "Gradient of w2: -3.0000",
        "Gradient of x: -2.2500",
    ],
    "04_debugging_gradients.ipynb": [
        "non-finite cotangent at 'sqrt'",
        "hooked gradient == custom_vjp gradient: True",
    ],
}


@pytest.fixture(scope="session")
def kernel_env(tmp_path_factory):
    """A `python3` kernel spec that runs this interpreter (the venv's), whatever PATH says."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (chainrule tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return str(root)


def test_every_tutorial_has_a_notebook():
    assert NAMES == sorted(KEY_NUMBERS)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, kernel_env, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", kernel_env)  # searched before user and system dirs
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    path = os.path.join(NOTEBOOKS, name)
    nb = nbformat.read(path, as_version=4)
    # Committed notebooks carry no outputs.
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), name
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=120,
        resources={"metadata": {"path": NOTEBOOKS}},
    )
    try:
        client.execute(cwd=NOTEBOOKS)
    except CellExecutionError as e:
        pytest.fail(f"{name} failed:\n{e}")
    text = "\n".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream"
    )
    for number in KEY_NUMBERS[name]:
        assert number in text, f"{name} did not print {number!r}:\n{text}"
