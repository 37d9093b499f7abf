"""Test-wide settings; runs before any test module imports numpy or jax."""

import os
import sys
from pathlib import Path

# numpy's OpenBLAS worker threads spin and steal the cores XLA computes on (a 2-core machine runs
# two test workers); the library itself calls no BLAS/LAPACK for the Cayley map.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Most tests compile many small XLA programs and run each once or twice, so the suite is
# compile-bound; the test process asks XLA:CPU for cheaper compilation:
# - no LLVM optimizations (--xla_backend_optimization_level=0): test_ops + test_butterfly
#   168 s -> 133 s on 2 cores;
# - XLA:CPU's older elemental loop emitters instead of its MLIR fusion emitters
#   (--xla_cpu_use_fusion_emitters=false): test_linen -k merged_params 54.7 s -> 34.1 s (XLA
#   compile time 36.9 s -> 16.5 s).  The programs it makes run slower (the default ViT job run
#   in-process: 75.6 s -> 94.0 s), so the run-bound end-to-end jobs run as subprocesses with the
#   caller's own XLA_FLAGS (tests/jobs.py), i.e. XLA's defaults.  With both, the whole suite took
#   14.4 min instead of 18.2 on a 2-core AMD EPYC VM (2026-11-30, back to back).  The flag is
#   added only where this jaxlib knows it (XLA aborts the process on an unknown flag).
# Neither changes the math (XLA enables no fast-math either way), and the suite passes with and
# without them.  BOFT_JAX_TEST_XLA_OPT=1 keeps XLA's defaults everywhere.  Set once, by the first
# pytest process; xdist workers inherit the environment.
_FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def _xla_knows(flag: str) -> bool:
    import subprocess

    probe = subprocess.run(
        [sys.executable, "-c", "import jax, jax.numpy as jnp; jax.jit(lambda x: x + 1)(jnp.zeros(2)).block_until_ready()"],
        env=dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3"),
        capture_output=True,
        timeout=300,
    )
    return probe.returncode == 0


os.environ.setdefault("BOFT_JAX_TEST_USER_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
if os.environ.get("BOFT_JAX_TEST_XLA_OPT") != "1" and "BOFT_JAX_TEST_XLA_FLAGS_SET" not in os.environ:
    os.environ["BOFT_JAX_TEST_XLA_FLAGS_SET"] = "1"
    for _flag in _FAST_COMPILE_FLAGS:
        _name = _flag.split("=")[0]
        if _name not in os.environ.get("XLA_FLAGS", "") and (_flag == _FAST_COMPILE_FLAGS[0] or _xla_knows(_flag)):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
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


def pytest_collection_modifyitems(config, items):
    """Run the slow end-to-end tests first (a stable sort: otherwise in collection order).

    With ``-n 2`` each worker takes the next test as it finishes one; long tests at the end of
    the order leave the other worker idle for their length (30-60 s each), long tests first fill
    the time with the many short ones instead.  Every test is independent of the order."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config):
    if _xla_cache is not None:
        import shutil

        shutil.rmtree(_xla_cache, ignore_errors=True)
