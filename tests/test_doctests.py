"""The ``>>>`` examples in the library's docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import warnings

import pytest

import boft_jax

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(boft_jax.__path__, "boft_jax.") if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    """...and warn about nothing: a user who copies an example should not see a warning (an
    unhashable model made apply_multi's example run op by op, with a warning, until 2026-12-06)."""
    module = importlib.import_module(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a warning raised inside an example fails that example
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"


def test_sharding_examples_also_run_on_a_machine_with_several_devices():
    """boft_jax.sharding's examples build meshes: they must not assume a single device (they used
    ``make_mesh("data=1")``, refused wherever jax sees more than one)."""
    import subprocess
    import sys

    from jobs import ROOT, job_env

    code = ("import doctest, jax, boft_jax.sharding as m; assert jax.device_count() == 4;"
            " r = doctest.testmod(m, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE);"
            " print('RESULT', r.failed, r.attempted)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=job_env(4, fast_compile=True),
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    failed, attempted = map(int, r.stdout.split("RESULT", 1)[1].split())
    assert failed == 0 and attempted >= 5, r.stdout[-3000:]
