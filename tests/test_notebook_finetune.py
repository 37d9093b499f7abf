"""notebooks/finetune_vit.ipynb: runs top to bottom (small size), and the committed copy is a full run.

The notebook walks through the whole public API (load the bundled ViT, wrap, init_adapter, train
with Optax, save/load, merge/unmerge) and ``assert``s its own results, so executing it is a real
end-to-end test.  ``BOFT_NOTEBOOK_SMALL=1`` cuts training to 30 steps; what remains is mostly XLA
compilation (about a minute on an idle 2-core CPU).

The kernel is launched from a kernelspec written for this test whose ``argv`` is
``sys.executable``: the notebook runs in the interpreter running pytest (the project's venv), never
in whatever ``python3`` kernel a user-level Jupyter installation happens to register.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "finetune_vit.ipynb"
SMALL_ENV = {"BOFT_NOTEBOOK_SMALL": "1"}
CELL_TIMEOUT_S = 900  # per cell; the training cell is the longest (compilation + 30 steps)
KERNEL_NAME = "boft-jax-test-python"

_ACCURACY = re.compile(r"held-out accuracy on the new digits 5-9: ([0-9.]+) -> ([0-9.]+)")


def _kernel_manager(kernel_dir: pathlib.Path):
    """An AsyncKernelManager whose only kernelspec runs ipykernel with this very interpreter."""
    import jupyter_client  # the test extra: a missing notebook dependency fails, never skips
    from jupyter_client.kernelspec import KernelSpecManager

    spec = kernel_dir / KERNEL_NAME
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "boft_jax tests",
                "language": "python",
            }
        )
    )
    ksm = KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    return jupyter_client.AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)


def execute(path: pathlib.Path, env: dict[str, str], kernel_dir: pathlib.Path, timeout: int = CELL_TIMEOUT_S):
    """Execute the notebook at ``path`` (cwd = its folder, repository root on PYTHONPATH).

    A first cell is prepended that reports the kernel's interpreter, so the caller can check it.
    Raises ``nbclient.exceptions.CellExecutionError`` (with the cell's traceback) when a cell fails.
    """
    import nbformat  # the test extra: a missing notebook dependency fails, never skips
    import nbclient
    import ipykernel  # noqa: F401  (the kernel that the client launches)
    nb = nbformat.read(path, as_version=4)
    probe = nbformat.v4.new_code_cell("import sys\nprint('KERNEL_EXECUTABLE=' + sys.executable)")
    nb.cells.insert(0, probe)
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(kernel_dir),
        timeout=timeout,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute(env={**os.environ, "PYTHONPATH": pythonpath, **env})
    return nb


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _errors(nb) -> list[str]:
    return [
        f"{o.get('ename')}: {o.get('evalue')}"
        for c in _code_cells(nb)
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]


def _stream_text(nb) -> str:
    return "".join(
        o.get("text", "") for c in _code_cells(nb) for o in c.get("outputs", []) if o.get("output_type") == "stream"
    )


def _accuracies(nb) -> tuple[float, float]:
    m = _ACCURACY.search(_stream_text(nb))
    assert m, "the notebook's summary line (held-out accuracy before -> after) is missing"
    return float(m.group(1)), float(m.group(2))


@pytest.mark.slow
def test_finetune_notebook_runs_small(tmp_path):
    assert NOTEBOOK.exists(), NOTEBOOK
    t0 = time.perf_counter()
    nb = execute(NOTEBOOK, SMALL_ENV, tmp_path / "kernels")
    elapsed = time.perf_counter() - t0
    assert not _errors(nb), _errors(nb)
    assert all(c.get("execution_count") for c in _code_cells(nb)), "a cell did not run"
    text = _stream_text(nb)
    kernel_python = re.search(r"KERNEL_EXECUTABLE=(.*)", text).group(1).strip()
    assert os.path.realpath(kernel_python) == os.path.realpath(sys.executable), (kernel_python, sys.executable)
    assert "SMALL-size run" in text, "BOFT_NOTEBOOK_SMALL did not reach the kernel"
    before, after = _accuracies(nb)
    assert after > before, (before, after)
    assert any("image/png" in o.get("data", {}) for c in _code_cells(nb) for o in c.get("outputs", []))
    print(f"finetune_vit.ipynb (small): executed in {elapsed:.1f} s, accuracy {before:.3f} -> {after:.3f}")


def test_committed_finetune_notebook_is_a_full_run():
    """The committed notebook carries full-size outputs (figures show on GitHub) and stays small."""
    import nbformat  # the test extra: a missing notebook dependency fails, never skips
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = _code_cells(nb)
    assert code and all(c.get("execution_count") for c in code), "notebook is not fully executed"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"not executed top to bottom in one kernel: {counts}"
    assert not _errors(nb), _errors(nb)
    text = _stream_text(nb)
    assert "FULL-size run" in text and "SMALL-size run" not in text, "the committed notebook is not a full-size run"
    figures = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
    assert figures >= 3, f"expected the data, training-curve and rotation figures, found {figures}"
    before, after = _accuracies(nb)
    assert before < 0.2 and after > 0.8, (before, after)
    assert NOTEBOOK.stat().st_size < 1_000_000, NOTEBOOK.stat().st_size
