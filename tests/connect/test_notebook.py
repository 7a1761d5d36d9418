"""jobs/notebooks/quickstart.ipynb, executed by a real Jupyter kernel (nbclient + ipykernel), on a
classic session and on Spark Connect (``SPARK_REMOTE=local[2]``)."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from sparkdl.testing import connect_unavailable

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
NOTEBOOK = os.path.join(ROOT, "jobs", "notebooks", "quickstart.ipynb")

pytestmark = pytest.mark.timeout(600)


def _outputs(cell):
    """(output types, all text) of an executed cell."""
    kinds, text = [], []
    for out in cell.get("outputs", []):
        kinds.append(out["output_type"])
        if "text" in out:
            text.append(out["text"])
        for mime in ("text/plain", "text/html"):
            if mime in out.get("data", {}):
                text.append(out["data"][mime])
    return kinds, "\n".join(text)


@pytest.mark.parametrize("mode", ["classic", "connect"])
def test_the_quickstart_notebook_runs_in_a_kernel(mode, tmp_path):
    nbclient = pytest.importorskip("nbclient", reason="the dev extra installs nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    if mode == "connect" and connect_unavailable():
        pytest.skip(connect_unavailable())
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()  # the kernel starts its own Spark; two drivers on 2 cores are slow
    shutil.copytree(os.path.join(ROOT, "data", "digits"), tmp_path / "data" / "digits")
    env = {**os.environ, "QUICKSTART_EPOCHS": "5", "PYTHONPATH": ROOT}
    env.pop("SPARK_REMOTE", None)
    if mode == "connect":
        env["SPARK_REMOTE"] = "local[2]"
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=500, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute(env=env)
    cells = [c for c in notebook.cells if c.cell_type == "code"]
    for cell in cells:
        kinds, text = _outputs(cell)
        assert "error" not in kinds, text
    _, session = _outputs(cells[0])
    assert ("Spark Connect" if mode == "connect" else "classic session") in session
    _, fit = _outputs(cells[1])  # the progress: a text bar or a widget, never an error
    widgets = [
        o
        for o in cells[1].outputs
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    assert "epoch 5/5" in fit or widgets, fit
    _, metrics = _outputs(cells[2])
    assert "epoch" in metrics and "loss" in metrics
    _, accuracy = _outputs(cells[3])
    found = re.search(r"test accuracy (\d\.\d+)", accuracy)
    assert found and float(found.group(1)) >= 0.9, accuracy
    _, status = _outputs(cells[4])
    assert "succeeded" in status
