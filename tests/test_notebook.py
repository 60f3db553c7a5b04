"""examples/quickstart.ipynb runs top to bottom (so it never rots) and asserts its own losslessness."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from longspec_jax import demo

    assert demo.available(), "the demo pair is missing from longspec_jax/demo"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env_backup = dict(os.environ)
    try:
        os.environ.pop("XLA_FLAGS", None)  # one CPU device in the kernel, as a user would have
        os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
        os.environ["MPLBACKEND"] = "Agg"
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "tau =" in outputs and "speedup" in outputs and "reused" in outputs
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
