"""Test-wide settings; runs before any test module imports numpy or jax."""

import os
import sys
from pathlib import Path

# numpy's OpenBLAS worker threads spin and steal the cores XLA computes on (a 2-core machine runs
# two test workers); the library itself calls no BLAS/LAPACK for the Cayley map.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# `import train` / `import benchmarks` from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
