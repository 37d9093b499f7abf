"""Test-wide settings; runs before any test module imports numpy or jax."""

import os
import sys
from pathlib import Path

# jaxlib's CPU LAPACK (the Cayley map's batched solve) comes from scipy's OpenBLAS, whose worker
# threads spin on small batched solves and slow them 100x on a busy 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# `import train` / `import benchmarks` from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
