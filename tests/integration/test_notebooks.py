"""The notebooks as files: valid, outputs stripped in git, and each one reads the demo's outputs.
(They are executed on real demo outputs in test_demo.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_valid_and_stripped(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "no code cells"
    for cell in code:
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, "outputs not stripped"
        compile(cell.source, f"{path.name}:{cell.get('id')}", "exec")  # syntax errors fail here, not in a kernel
    assert "RIGFACE_DEMO_OUTPUTS" in code[0].source
