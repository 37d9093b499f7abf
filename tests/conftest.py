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
# A persistent XLA compilation cache, one fresh folder per test worker (deleted at exit), for the
# programs that take >= 1 s to compile.  The end-to-end tests run the training job several times
# (in this process and as subprocesses, which inherit the setting): an interrupted job and its
# resumption, a job and its reference run, compile the same training step.  Per worker, because
# JAX writes cache entries without a lock: two workers sharing a folder could read each other's
# half-written entries.  (The two processes of the multi-process test share their worker's
# folder; JAX writes entries from process 0 only, and reads a truncated entry back as a warning
# and a recompile.)  Subprocesses with other XLA_FLAGS get other cache keys.  A folder the user
# set in JAX_COMPILATION_CACHE_DIR is used as it is.  BOFT_JAX_TEST_XLA_CACHE=0 turns it off.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
_ours = os.environ.get("BOFT_JAX_TEST_XLA_CACHE_OF")  # set below: the folder is this suite's
if os.environ.get("BOFT_JAX_TEST_XLA_CACHE") != "0" and (
    "JAX_COMPILATION_CACHE_DIR" not in os.environ or (_ours is not None and _ours != _worker)
):
    import atexit
    import shutil
    import tempfile

    # xdist workers inherit the controller's environment, hence the owner check above
    _cache = tempfile.mkdtemp(prefix=f"boft_jax-xla-cache-{_worker}-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)  # and in pytest_unconfigure: a
    # worker that xdist ends does not always run its atexit handlers

    def pytest_unconfigure(config):
        shutil.rmtree(_cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["BOFT_JAX_TEST_XLA_CACHE_OF"] = _worker
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
