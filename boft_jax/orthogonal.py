"""Orthogonal blocks from packed skew-symmetric parameters (the Cayley map).

Each BOFT block is an orthogonal ``b x b`` matrix ``Q = (I - S)(I + S)^(-1)`` where ``S`` is
skew-symmetric (``S^T = -S``).  A skew-symmetric matrix is fixed by its strict upper triangle, so we
store only those ``b(b-1)/2`` numbers per block ("packed" form).  PEFT's reference stores a full
``b x b`` matrix ``A`` and uses ``S = 0.5 (A - A^T)``; :func:`pack_skew` converts such a matrix to
our packed form exactly.

Everything here imports only jax and numpy.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import boft_jax as boft
  >>> p = 0.1 * jax.random.normal(jax.random.key(0), (3, 6))   # 3 blocks of size 4: 4*3/2 = 6
  >>> q = boft.cayley(p, block_size=4)
  >>> q.shape
  (3, 4, 4)
  >>> bool(jnp.allclose(q @ jnp.swapaxes(q, -1, -2), jnp.eye(4), atol=1e-6))
  True
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "num_skew_params",
    "block_size_from_num_params",
    "pack_skew",
    "unpack_skew",
    "cayley",
    "CayleyMethod",
]

CayleyMethod = Literal["exact", "neumann"]


def num_skew_params(block_size: int) -> int:
    """Number of free parameters of one ``b x b`` skew-symmetric block: ``b(b-1)/2``."""
    if int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    return block_size * (block_size - 1) // 2


def block_size_from_num_params(n: int) -> int:
    """Inverse of :func:`num_skew_params`: the ``b`` with ``b(b-1)/2 == n``.

    Raises ``ValueError`` when ``n`` is not a triangular number.
    """
    b = int(round((1 + np.sqrt(1 + 8 * n)) / 2))
    if b * (b - 1) // 2 != n:
        raise ValueError(
            f"a packed skew-symmetric block must have b(b-1)/2 entries (0, 1, 3, 6, 10, 15, 21, 28, ...);"
            f" got a last axis of size {n}"
        )
    return b


@functools.lru_cache(maxsize=None)
def _upper_index(block_size: int) -> np.ndarray:
    """(b, b) int array: 1 + position in the packed vector for i < j, else 0 (a zero slot)."""
    b = block_size
    idx = np.zeros((b, b), dtype=np.int32)
    rows, cols = np.triu_indices(b, k=1)
    idx[rows, cols] = np.arange(1, rows.size + 1, dtype=np.int32)
    return idx


def unpack_skew(packed: jax.Array, block_size: int | None = None) -> jax.Array:
    """Skew-symmetric matrices from their packed strict upper triangles.

    Args:
      packed: ``(..., b(b-1)/2)`` entries ``S[i, j]`` for ``i < j`` in row-major order (the order of
        ``numpy.triu_indices(b, 1)``).
      block_size: ``b``; inferred from the last axis when omitted, checked when given.

    Returns:
      ``(..., b, b)`` array ``S`` with ``S^T = -S``.
    """
    packed = jnp.asarray(packed)
    b = block_size_from_num_params(packed.shape[-1])
    if block_size is not None and block_size != b:
        raise ValueError(
            f"packed skew parameters have a last axis of {packed.shape[-1]} = b(b-1)/2 for b = {b},"
            f" but block_size = {block_size} was given (expects a last axis of"
            f" {num_skew_params(block_size)})"
        )
    padded = jnp.concatenate([jnp.zeros(packed.shape[:-1] + (1,), packed.dtype), packed], axis=-1)
    upper = jnp.take(padded, jnp.asarray(_upper_index(b)), axis=-1)  # (..., b, b), static indices
    return upper - jnp.swapaxes(upper, -1, -2)


def pack_skew(matrix: jax.Array) -> jax.Array:
    """Packed form of the skew-symmetric part ``0.5 (A - A^T)`` of square matrices ``A``.

    This is exactly how PEFT's BOFT turns its stored ``boft_R`` blocks into skew matrices, so
    ``unpack_skew(pack_skew(A)) == 0.5 * (A - A^T)``.

    Args:
      matrix: ``(..., b, b)``.

    Returns:
      ``(..., b(b-1)/2)``.
    """
    matrix = jnp.asarray(matrix)
    if matrix.ndim < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"pack_skew expects (..., b, b) square blocks, got shape {matrix.shape}")
    b = matrix.shape[-1]
    rows, cols = np.triu_indices(b, k=1)
    return 0.5 * (matrix[..., rows, cols] - matrix[..., cols, rows])


def cayley(
    params: jax.Array,
    block_size: int | None = None,
    method: CayleyMethod = "exact",
    *,
    neumann_terms: int = 5,
) -> jax.Array:
    """Orthogonal blocks ``Q = (I - S)(I + S)^(-1)`` from packed skew parameters.

    Computed in float32 (or float64 when the input is float64) whatever the input dtype, so
    bf16 models still get accurately orthogonal rotations; cast the result if you need to.

    Args:
      params: ``(..., b(b-1)/2)`` packed skew-symmetric parameters (see :func:`unpack_skew`).
      block_size: ``b``; inferred from ``params`` when omitted, checked when given.
      method: ``"exact"`` solves ``(I + S) Q = I - S`` with a batched linear solve (no explicit
        inverse; ``I - S`` and ``(I + S)^(-1)`` commute, so this is the Cayley map).
        ``"neumann"`` replaces ``(I + S)^(-1)`` by the truncated series ``sum_{j<n} (-S)^j``
        (``n = neumann_terms``): cheaper, only approximately orthogonal, accurate while
        ``||S|| < 1``, and it rotates in the same direction as the exact map (it converges to it as
        ``n`` grows).
      neumann_terms: number of series terms ``n >= 1`` for ``method="neumann"``.

    Returns:
      ``(..., b, b)`` blocks; ``Q = I`` at ``params = 0``.
    """
    params = jnp.asarray(params)
    dtype = jnp.float64 if params.dtype == jnp.float64 else jnp.float32
    s = unpack_skew(params.astype(dtype), block_size)
    b = s.shape[-1]
    eye = jnp.eye(b, dtype=dtype)
    if method == "exact":
        # Both operands are broadcast to the batch shape: jnp.linalg.solve wants equal batch dims.
        return jnp.linalg.solve(eye + s, jnp.broadcast_to(eye, s.shape) - s)
    if method == "neumann":
        if int(neumann_terms) != neumann_terms or neumann_terms < 1:
            raise ValueError(f"neumann_terms must be an integer >= 1, got {neumann_terms!r}")
        # sum_{j<n} (-S)^j by Horner's rule: T <- I - S T, n-1 times.
        series = jnp.broadcast_to(eye, s.shape)
        for _ in range(int(neumann_terms) - 1):
            series = eye - s @ series
        return (eye - s) @ series
    raise ValueError(f"cayley method must be 'exact' or 'neumann', got {method!r}")
