"""Strip outputs, execution counts and widget state from notebooks before committing them.

    python scripts/strip_notebooks.py                 # every notebooks/*.ipynb
    python scripts/strip_notebooks.py path.ipynb ...  # these

tests/test_notebooks.py fails on a committed notebook that still carries outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat


def strip(path: Path) -> bool:
    """Strip one notebook in place; return whether it changed."""
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)  # nbclient's timings
    nb.metadata.pop("widgets", None)
    after = nbformat.writes(nb)
    if after != before:
        nbformat.write(nb, path)
    return after != before


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", type=Path)
    args = ap.parse_args(argv)
    paths = args.paths or sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
    for p in paths:
        print(f"{'stripped' if strip(p) else 'clean   '} {p}")


if __name__ == "__main__":
    main()
