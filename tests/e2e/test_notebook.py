"""The Colab demo notebook executes top to bottom (tiny size, from the tiny pretrained reference) and
produces its figures."""

from __future__ import annotations

import json
import os

import pytest

from ng_jax.config.methods import load_config_file
from tests.fixtures import REPO

pytestmark = pytest.mark.slow

NOTEBOOK = os.path.join(REPO, "notebooks", "normguard_demo.ipynb")


def test_demo_notebook_runs(tmp_path, monkeypatch, tiny_reference):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("NG_DEMO_TINY", "1")
    monkeypatch.setenv("NG_DEMO_WORKDIR", str(tmp_path / "demo"))
    monkeypatch.setenv("NG_DEMO_REFERENCE", tiny_reference.bundle)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the curves and the sample grids
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "awm_normguard" in text and "norm ratio" in text
    for name in ("awm", "awm_normguard"):
        summary = json.load(open(tmp_path / "demo" / name / "summary.json"))
        assert summary["epochs"] == 2 and summary["normguard"]["lam"] == (
            load_config_file(f"{name}.py").normguard.lam if name.endswith("guard") else 0.0)
