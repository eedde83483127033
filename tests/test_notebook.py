"""examples/step_by_step.ipynb executes from top to bottom and its registration helps.

The notebook is stored without outputs; this test runs it with nbclient in a kernel of the
interpreter running the tests (a temporary ``python3`` kernelspec that points at
``sys.executable``, found first through ``JUPYTER_PATH``), so it uses this environment's
napari_histreg whatever other kernels the machine has. Skipped without ../shared/data.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "step_by_step.ipynb"


def test_notebook_is_stored_clean():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "strip the outputs before committing"


def _python3_kernelspec_here(folder: Path) -> Path:
    spec = folder / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (napari-histreg tests)",
                "language": "python",
            }
        )
    )
    return folder


def test_step_by_step_notebook_executes(shared_data, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    jupyter_path = str(_python3_kernelspec_here(tmp_path / "jupyter"))
    if os.environ.get("JUPYTER_PATH"):
        jupyter_path += os.pathsep + os.environ["JUPYTER_PATH"]
    monkeypatch.setenv("JUPYTER_PATH", jupyter_path)
    monkeypatch.setenv("HISTREG_DATA", str(shared_data))
    # One torch thread in the kernel: on a small shared CPU that is several times faster.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    outputs = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 6, "the notebook shows the intermediate images"

    summary_cells = [cell for cell in nb.cells if "summary" in cell.get("metadata", {}).get("tags", [])]
    assert len(summary_cells) == 1
    text = "".join(o.get("text", "") for o in summary_cells[0].outputs if o.output_type == "stream")
    line = next(line for line in text.splitlines() if line.startswith("SUMMARY "))
    summary = json.loads(line[len("SUMMARY ") :])
    assert summary["initial_MrTRE"] > 0.015  # rat kidney: ~0.021 before registration
    assert summary["final_MrTRE"] < summary["initial_MrTRE"] / 3
    assert summary["final_MrTRE"] < 0.01
    assert summary["stages"]["affine"] < summary["initial_MrTRE"]
    assert summary["custom_pipeline_MrTRE"] < summary["initial_MrTRE"] / 3
