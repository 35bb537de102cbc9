"""The Colab demo notebook executes top to bottom (tiny size, from the tiny pretrained reference) and
produces its figures; its summary of the grid reads the report's JSON (here one the report code wrote from
hand-made runs) or says that it is absent."""

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

    from ng_jax.eval import report
    from tests.unit.test_grid_report import _paired, _write

    c, runs = _write(tmp_path / "grid_report", _paired)
    report.write_results(c, c.workdir, runs, 60.0)
    results = tmp_path / "grid_report" / "results" / "RESULTS.json"
    monkeypatch.setenv("NG_DEMO_RESULTS", str(results))
    monkeypatch.setenv("NG_DEMO_TINY", "1")
    monkeypatch.setenv("NG_DEMO_WORKDIR", str(tmp_path / "demo"))
    monkeypatch.setenv("NG_DEMO_REFERENCE", tiny_reference.bundle)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 3  # the curves, the sample grids and the grid's norm ratio figure
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "awm_normguard" in text and "norm ratio" in text
    verdicts = json.load(open(results))["verdicts"]["preference"]
    assert {v["n"] for v in verdicts} == {0, 5}   # measured claims, and one without its endpoint
    for v in verdicts:   # every claim, with its verdict and interval as the report computed them
        assert (f"{v['verdict']:>13s}  {v['claim']}: {v['mean']:.3g} [{v['t_low']:.3g}, {v['t_high']:.3g}], 5 seeds"
                if v["n"] else f"{v['verdict']:>13s}  {v['claim']}\n") in text
    for name in ("awm", "awm_normguard"):
        summary = json.load(open(tmp_path / "demo" / name / "summary.json"))
        assert summary["epochs"] == 2 and summary["normguard"]["lam"] == (
            load_config_file(f"{name}.py").normguard.lam if name.endswith("guard") else 0.0)
