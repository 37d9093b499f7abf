"""Test-wide settings; runs before any test module imports numpy or jax."""

import os
import sys
from pathlib import Path

# numpy's OpenBLAS worker threads spin and steal the cores XLA computes on (a 2-core machine runs
# two test workers); the library itself calls no BLAS/LAPACK for the Cayley map.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Most tests compile many small XLA programs and run each once or twice; XLA:CPU compiles them
# about 20% faster without LLVM's optimizations (test_ops + test_butterfly: 168 s -> 133 s on 2
# cores).  XLA enables no fast-math either way, and the suite passes with and without this.  Training
# jobs that tests launch as subprocesses get the caller's own XLA_FLAGS back (test_finetune._env).
# BOFT_JAX_TEST_XLA_OPT=1 keeps full optimization everywhere.
os.environ.setdefault("BOFT_JAX_TEST_USER_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
if os.environ.get("BOFT_JAX_TEST_XLA_OPT") != "1" and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
# `import train` / `import benchmarks` from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# A persistent XLA compilation cache, one fresh folder per test process (deleted at the end), for
# the programs that take >= 1 s to compile.  The end-to-end tests run the training job several
# times (in this process and as subprocesses, which inherit the setting): an interrupted job and
# its resumption, a job and its reference run, compile the same training step.  One folder per
# xdist worker, because JAX writes cache entries without a lock (the two processes of the
# multi-process test share their worker's folder: JAX writes entries from process 0 only, and
# reads a truncated entry back as a warning and a recompile).  Subprocesses with other XLA_FLAGS
# get other cache keys.  A folder the user set in JAX_COMPILATION_CACHE_DIR is used as it is.
# BOFT_JAX_TEST_XLA_CACHE=0 turns it off.  Set in pytest_configure, before collection imports jax.
_xla_cache: str | None = None


def pytest_configure(config):
    global _xla_cache
    if os.environ.get("BOFT_JAX_TEST_XLA_CACHE") == "0" or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    if config.getoption("numprocesses", None) and not hasattr(config, "workerinput"):
        return  # the xdist controller runs no tests; each worker makes its own folder
    if "jax" in sys.modules:  # too late for the environment variable: say so rather than run uncached
        raise RuntimeError("tests/conftest.py: jax was imported before pytest_configure; the compilation cache cannot be set")
    import tempfile

    worker = getattr(config, "workerinput", {}).get("workerid", "main")
    _xla_cache = tempfile.mkdtemp(prefix=f"boft_jax-xla-cache-{worker}-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")


def pytest_unconfigure(config):
    if _xla_cache is not None:
        import shutil

        shutil.rmtree(_xla_cache, ignore_errors=True)
