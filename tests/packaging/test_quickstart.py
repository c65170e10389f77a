"""examples/quickstart.ipynb runs from top to bottom in the suite (issue 31 item 8), so it never rots."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "quickstart.ipynb"
KERNEL = "neco-quickstart"


def test_the_stored_notebook_is_valid_and_has_no_outputs() -> None:
    """Outputs of a random-init model would be misleading pictures and noisy diffs; the test run makes them."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    assert all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_the_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scenes, export, in-process serving, bank, segment, PCA: every cell runs and both pictures show inline."""
    # The kernel is this interpreter (the environment under test), whatever kernels the machine has installed.
    write_kernel_spec(tmp_path / "jupyter" / "kernels" / KERNEL)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name=KERNEL, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    pictures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(pictures) == 2  # the segmentation overlay and the PCA of the features
    printed = "".join(output.get("text", "") for output in outputs if output.get("name") == "stdout")
    assert "mask (112, 112)" in printed
    assert "features (8, 8, 384)" in printed
