"""Every notebook in notebooks/ executes top to bottom on CPU (nbclient), and the plots are produced."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path):
    """Run in the notebooks/ folder (their relative paths point at ../demo, ../conversion); the file is not
    written back, and the notebooks keep their own temporary files in temporary directories."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    had_plot = any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    if had_plot:  # a committed plot must be reproduced by the run
        assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
