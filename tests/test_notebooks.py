"""The notebooks under notebooks/ run top to bottom (at their small sizes) and their asserts hold.

Each notebook reads an environment variable that shrinks its experiments so that a run takes
seconds; the committed notebooks are executed at full size.  To add a notebook, add an entry to
``NOTEBOOKS``: file name -> environment variables for its kernel.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import jax
import numpy as np
import pytest

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"

NOTEBOOKS: dict[str, dict[str, str]] = {
    "butterfly_expressivity.ipynb": {"BOFT_NOTEBOOK_SMALL": "1"},
}

# Per-cell limit; the small runs take well under a minute on 2 cores.
CELL_TIMEOUT_S = 600


def execute_notebook(path: pathlib.Path, env: dict[str, str], timeout: int = CELL_TIMEOUT_S):
    """Execute the notebook at ``path`` in a fresh ``python3`` kernel, cwd = its folder.

    The kernel inherits this process's environment plus ``env``.  ``python3`` is ipykernel's
    kernel; jupyter_client launches it with ``sys.executable``, i.e. the interpreter running the
    tests.  Raises ``nbclient.exceptions.CellExecutionError`` (with the cell's traceback) when a
    cell fails.
    """
    import nbformat  # the test extra: a missing notebook dependency fails, never skips
    import nbclient
    import ipykernel  # noqa: F401  (the kernel that the client launches)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=timeout,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute(env={**os.environ, **env})
    return nb


def _errors(nb) -> list[str]:
    return [
        f"{out.get('ename')}: {out.get('evalue')}"
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs(name):
    path = NOTEBOOKS_DIR / name
    assert path.exists(), path
    t0 = time.perf_counter()
    nb = execute_notebook(path, NOTEBOOKS[name])
    assert not _errors(nb), _errors(nb)
    assert all(c.get("outputs") is not None for c in nb.cells if c.cell_type == "code")
    print(f"{name}: executed in {time.perf_counter() - t0:.1f} s")


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_committed_notebook_is_executed(name):
    """The committed notebook carries its full-size outputs (figures show on GitHub) and is small."""
    import nbformat  # the test extra: a missing notebook dependency fails, never skips
    path = NOTEBOOKS_DIR / name
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "notebook is not fully executed"
    assert not _errors(nb), _errors(nb)
    assert any("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", [])), "no figures"
    text = "".join(o.get("text", "") for c in code for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "SMALL-size run" not in text, "the committed notebook was executed in small mode"
    assert path.stat().st_size < 1_600_000, path.stat().st_size


# ---------------------------------------------------------------------------------------------
# The expressivity notebook's helper module (quick checks; the notebook asserts the rest)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ex():
    sys.path.insert(0, str(NOTEBOOKS_DIR))
    try:
        import _expressivity
    finally:
        sys.path.remove(str(NOTEBOOKS_DIR))
    return _expressivity


def test_haar_orthogonal(ex):
    q = ex.haar_orthogonal(48, seed=3)
    np.testing.assert_allclose(q.T @ q, np.eye(48), atol=1e-12)
    np.testing.assert_array_equal(q, ex.haar_orthogonal(48, seed=3))
    # Sign correction: G = Q R with R upper triangular and diag(R) > 0 (the unique such QR of
    # the Gaussian G that haar_orthogonal draws), which is what makes Q Haar-distributed.
    g = np.random.default_rng(3).standard_normal((48, 48))
    r = q.T @ g
    np.testing.assert_allclose(np.tril(r, -1), 0, atol=1e-10)
    assert np.all(np.diag(r) > 0)


@pytest.mark.parametrize("d,b,expected", [(32, 4, 4), (64, 2, 6), (512, 16, 6), (96, 4, None), (768, 8, None)])
def test_factors_until_dense(ex, d, b, expected):
    assert ex.factors_until_dense(d, b) == expected


def test_structural_patterns_match_library(ex):
    d, b, m = 32, 4, 4
    blocks = ex.random_blocks(d, b, m, seed=1)
    pattern_f, pattern_c = ex.structural_patterns(d, b, m)
    np.testing.assert_array_equal(ex.factor_matrices(blocks) != 0, pattern_f)
    np.testing.assert_array_equal(ex.cumulative_products(blocks) != 0, pattern_c)


def test_oft_optimal_error(ex):
    # A block-diagonal rotation is fitted exactly by OFT with its block size, not by smaller blocks.
    d, b = 32, 8
    # float64 blocks: the error is sqrt(2 d - 2 sum(singular values)), so float32 rounding of an
    # orthogonal block (1e-7) would show as ~5e-4 with either sign.
    with jax.enable_x64(True):
        blocks = np.asarray(ex.random_blocks(d, b, 1, seed=2))[0]
    assert blocks.dtype == np.float64
    target = np.zeros((d, d))
    for j, q in enumerate(blocks):
        target[j * b : (j + 1) * b, j * b : (j + 1) * b] = q
    assert ex.oft_optimal_error(target, b) < 1e-5
    assert ex.oft_optimal_error(target, b // 2) > 0.1
    # det = -1 blocks cannot be reached from SO(b): the optimum flips the smallest singular value.
    flip = np.eye(d)
    flip[0, 0] = -1.0
    assert ex.oft_optimal_error(flip, b) == pytest.approx(2.0)


def test_fit_curves_hold_the_error_after_each_step(ex):
    """``curves[:, j]`` is ||M - Q||_F after j + 1 Adam steps (the notebook reads ``curves[:, c - 1]``
    as "after c steps"): the last entry is the final error, the first one a single step taken here
    with optax directly, in float64 numpy for the distance."""
    import jax.numpy as jnp
    import optax

    import boft_jax as boft

    d, b, m, steps, lr = 16, 4, 2, 5, 0.05
    targets = np.stack([ex.haar_orthogonal(d, seed=s) for s in (11, 12)])
    fit = ex.fit_boft(targets, m, b, steps=steps, lr=lr)
    assert fit.curves.shape == (2, steps)
    np.testing.assert_allclose(fit.curves[:, -1], fit.errors, rtol=1e-6)
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.01))
    for i, target in enumerate(targets):
        params = jnp.zeros((m, d // b, boft.num_skew_params(b)), jnp.float32)
        loss = lambda p: jnp.sum((boft.rotation_matrix(boft.cayley(p, block_size=b)) - target) ** 2)
        updates, _ = opt.update(jax.grad(loss)(params), opt.init(params), params)
        rot = np.asarray(boft.rotation_matrix(boft.cayley(optax.apply_updates(params, updates), block_size=b)), np.float64)
        np.testing.assert_allclose(fit.curves[i, 0], np.linalg.norm(rot - target), rtol=1e-4)
        assert abs(fit.curves[i, 0] - np.linalg.norm(np.eye(d) - target)) > 1e-3  # not the error at M = I
