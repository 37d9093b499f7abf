"""Butterfly permutations and the structured BOFT rotation ``x -> x M`` (never a d x d matrix).

Notation: ``d`` features, ``m`` butterfly factors, ``k`` blocks of size
``b`` per factor (``d = k b``).  Factor ``i`` is ``F_i = P_i blockdiag(Q_i0, ..., Q_i(k-1)) P_i^T``
with ``P_i[r, perm_i[r]] = 1`` and the rotation is ``M = F_{m-1} ... F_1 F_0``.

``perm_i`` groups the ``d`` features into chunks of ``b 2^i``; inside a chunk, it takes the
even-numbered half-blocks (``b/2`` features each) first and the odd-numbered ones after them.  Seen
through reshapes, ``x P_i`` is ``x.reshape(A, 2, G, h)`` read as ``(A, G, 2, h)`` with
``G = 2^i``, ``h = b/2`` and ``A = d / (b G)``: block ``j = a G + g`` of the permuted vector is the
pair of half-blocks ``x[a, 0, g, :]`` and ``x[a, 1, g, :]``.  So one factor is a single batched
matmul over the ``k`` blocks of an ``(..., A, 2, G, h)`` view of the input whose output comes out
already un-permuted: no gathers, no permutation matrices, ``2 d b`` FLOPs per row.

Factor ``i`` only mixes features inside chunks of ``b 2^i``, so ``M`` is block diagonal with dense
blocks of ``S = b 2^(m-1)``.  For ``m <= 4`` those ``(d/S, S, S)`` blocks are built once from the
factors (level by level, :func:`span_blocks`) and applied in a single batched matmul,
which on CPU is 2-2.5x faster than ``m`` passes over the rows (BENCHMARKS.md, rotate).

Example:
  >>> import jax, jax.numpy as jnp
  >>> import boft_jax as boft
  >>> m, d, b = 2, 16, 4
  >>> params = 0.1 * jax.random.normal(jax.random.key(0), (m, d // b, 6))
  >>> blocks = boft.cayley(params, block_size=b)                 # (m, k, b, b)
  >>> x = jax.random.normal(jax.random.key(1), (3, d))
  >>> y = boft.rotate(x, blocks)                                 # x @ M, shape (3, 16)
  >>> bool(jnp.allclose(y, x @ boft.rotation_matrix(blocks), atol=1e-5))
  True
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from boft_jax.orthogonal import num_skew_params, small_matmul

__all__ = [
    "butterfly_permutations",
    "structure_error",
    "valid_block_sizes",
    "max_factors",
    "rotate",
    "rotate_kernel",
    "rotation_matrix",
    "num_layer_params",
]


# --------------------------------------------------------------------------------------------
# Validity of (d, b, m)
# --------------------------------------------------------------------------------------------
def structure_error(d: int, block_size: int, n_factors: int) -> str | None:
    """Why ``(d, b, m)`` is not a valid butterfly structure, or ``None`` when it is.

    Valid means: ``b >= 1`` divides ``d``; ``m >= 1``; and for ``m > 1``: ``b`` even, ``k = d / b``
    even, and ``b 2^(m-1)`` divides ``d`` (the widest factor's chunks tile the features).
    """
    for name, v in (("d", d), ("block_size", block_size), ("n_factors", n_factors)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            return f"{name} must be a positive integer, got {v!r}"
    if d % block_size:
        return f"block_size {block_size} does not divide d = {d}"
    if n_factors > 1:
        if block_size % 2:
            return f"n_factors = {n_factors} > 1 needs an even block_size, got {block_size}"
        if (d // block_size) % 2:
            return f"n_factors = {n_factors} > 1 needs an even number of blocks, got {d // block_size}"
        span = block_size * 2 ** (n_factors - 1)
        if d % span:
            return (
                f"n_factors = {n_factors} with block_size {block_size} needs d divisible by"
                f" block_size * 2**(n_factors-1) = {span}, got d = {d}"
            )
    return None


def max_factors(d: int, block_size: int) -> int:
    """Largest valid ``m`` for ``(d, b)`` (``0`` when ``b`` does not divide ``d``).

    ``m = 1 + log2(d / b)`` when ``d / b`` is a power of two: then ``M`` can be fully dense.
    """
    for v in (d, block_size):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            return 0  # not a structure at all (d = 0 would otherwise halve k = 0 forever)
    if d % block_size:
        return 0
    if block_size % 2:
        return 1
    k, m = d // block_size, 1
    while k % 2 == 0:
        k //= 2
        m += 1
    return m


def valid_block_sizes(d: int, n_factors: int = 1) -> list[int]:
    """All block sizes ``b`` that fit ``d`` features with ``n_factors`` factors, ascending.

    ``b = 1`` (valid for ``m = 1``: the rotation is the identity, only the scale trains) is included,
    as PEFT accepts it too.

    >>> valid_block_sizes(24, 2)
    [2, 4, 6, 12]
    """
    return [b for b in range(1, d + 1) if structure_error(d, b, n_factors) is None]


def _check(d: int, block_size: int, n_factors: int) -> None:
    err = structure_error(d, block_size, n_factors)
    if err is not None:
        raise ValueError(
            f"invalid butterfly structure: {err}. Valid block sizes for d = {d} and"
            f" n_factors = {n_factors}: {_short(valid_block_sizes(d, n_factors))}; valid n_factors"
            f" for block_size = {block_size}: 1..{max(max_factors(d, block_size), 1)}"
            if max_factors(d, block_size)
            else f"invalid butterfly structure: {err}. Valid block sizes for d = {d} and"
            f" n_factors = {n_factors}: {_short(valid_block_sizes(d, n_factors))}"
        )


def _short(values: Sequence[int], limit: int = 16) -> str:
    if not values:
        return "none"
    if len(values) <= limit:
        return ", ".join(map(str, values))
    return ", ".join(map(str, values[:limit])) + f", ... ({len(values)} in all)"


# --------------------------------------------------------------------------------------------
# Permutations
# --------------------------------------------------------------------------------------------
def butterfly_permutations(d: int, block_size: int, n_factors: int) -> np.ndarray:
    """Static index arrays of the butterfly permutations, identical to PEFT's ``block_butterfly_perm``.

    Args:
      d: number of features (``d_in`` of the layer).
      block_size: ``b``.
      n_factors: ``m``.

    Returns:
      ``(m, d)`` int array; row ``i`` is ``perm_i`` (row 0 is the identity), and the permutation
      matrix is ``P_i[r, perm_i[r]] = 1``.

    Example:
      >>> import boft_jax as boft
      >>> boft.butterfly_permutations(8, 2, 3)[2].tolist()
      [0, 2, 4, 6, 1, 3, 5, 7]
    """
    _check(d, block_size, n_factors)
    perms = [np.arange(d)]
    for i in range(1, n_factors):
        g = 2**i
        perms.append(
            np.arange(d).reshape(d // (block_size * g), g, 2, block_size // 2).transpose(0, 2, 1, 3).reshape(d)
        )
    return np.stack(perms)


# --------------------------------------------------------------------------------------------
# Structured products
# --------------------------------------------------------------------------------------------
def _as_blocks(blocks: jax.Array, n_factors: int | None) -> jax.Array:
    """Normalize to ``(m, k, b, b)``; accepts ``(m*k, b, b)`` with ``n_factors`` given."""
    blocks = jnp.asarray(blocks)
    if blocks.ndim == 3 and n_factors is not None:
        if blocks.shape[0] % n_factors:
            raise ValueError(
                f"blocks of shape {blocks.shape} cannot be split into n_factors = {n_factors} factors"
            )
        blocks = blocks.reshape(n_factors, blocks.shape[0] // n_factors, *blocks.shape[1:])
    if blocks.ndim != 4 or blocks.shape[-1] != blocks.shape[-2]:
        raise ValueError(
            f"blocks must have shape (n_factors, n_blocks, b, b), got {blocks.shape}"
            " (use jax.vmap for a batch of block sets)"
        )
    if n_factors is not None and blocks.shape[0] != n_factors:
        raise ValueError(f"blocks have {blocks.shape[0]} factors but n_factors = {n_factors}")
    return blocks


def _factor_rows(x: jax.Array, q: jax.Array, level: int, precision) -> jax.Array:
    """``x F_level`` for row vectors ``x: (..., d)``; ``q: (k, b, b)`` blocks of that factor.

    One batched matmul ``(k, n, b) @ (k, b, b)`` on a view with the block axes first (the layout
    XLA's batched dot wants).  Written this way rather than as an einsum with the block axes in the
    middle (``"...acgh,agchex->...aegx"``), which XLA:CPU lowered with a transpose of the whole
    activation to tokens-last: see BENCHMARKS.md, "rotate (issue 2)", for the measured gain.
    Between consecutive factors XLA merges the transpose back and the next one into one copy.
    """
    k, b, _ = q.shape
    n = math.prod(x.shape[:-1])
    if level == 0:
        xv = x.reshape(n, k, b).transpose(1, 0, 2)  # (k, n, b)
        y = jnp.matmul(xv, q, precision=precision)
        return y.transpose(1, 0, 2).reshape(x.shape)
    g, h = 2**level, b // 2
    a = k // g
    # x.reshape(n, a, 2, g, h): block j = a g + g' is the pair of half-blocks [a, 0, g'] and [a, 1, g'].
    xv = x.reshape(n, a, 2, g, h).transpose(1, 3, 0, 2, 4).reshape(k, n, b)
    y = jnp.matmul(xv, q, precision=precision)  # (k, n, b)
    return y.reshape(a, g, n, 2, h).transpose(2, 0, 3, 1, 4).reshape(x.shape)


def _factor_cols(w: jax.Array, q: jax.Array, level: int, precision) -> jax.Array:
    """``F_level w`` for ``w: (d, n)``; ``q: (k, b, b)`` blocks of that factor.

    One batched matmul ``(k, b, b) @ (k, b, n)`` with the block axes first (see :func:`_factor_rows`).
    """
    k, b, _ = q.shape
    n = w.shape[1]
    if level == 0:
        return jnp.matmul(q, w.reshape(k, b, n), precision=precision).reshape(w.shape)
    g, h = 2**level, b // 2
    a = k // g
    wv = w.reshape(a, 2, g, h, n).transpose(0, 2, 1, 3, 4).reshape(k, b, n)
    y = jnp.matmul(q, wv, precision=precision)  # (k, b, n)
    return y.reshape(a, g, 2, h, n).transpose(0, 2, 1, 3, 4).reshape(w.shape)


# --------------------------------------------------------------------------------------------
# M as dense diagonal blocks: a product of m factors only mixes features inside chunks of S
# --------------------------------------------------------------------------------------------
def span(block_size: int, n_factors: int) -> int:
    """Width ``S = b 2^(m-1)`` of the dense diagonal blocks of ``M``."""
    return block_size * 2 ** (n_factors - 1)


def use_span(d: int, block_size: int, n_factors: int) -> bool:
    """Whether ``M`` is applied through its dense ``S x S`` diagonal blocks (:func:`span_blocks`).

    Yes for ``m = 1`` (the blocks themselves), and for ``m > 1`` while it costs at most 2x the
    FLOPs of the factored form (``S / (m b) = 2^(m-1) / m <= 2``, i.e. ``m <= 4``) and ``M`` has at
    least two diagonal blocks (``S < d``).  Otherwise (deep butterflies, whose ``M`` is dense or
    nearly so) ``M`` is applied factor by factor: ``2 m b d`` FLOPs per row, never a ``d x d`` array.
    """
    if n_factors == 1:
        return True
    return 2 ** (n_factors - 1) <= 2 * n_factors and span(block_size, n_factors) < d


def span_blocks(blocks: jax.Array) -> jax.Array:
    """The ``(G, S, S)`` dense diagonal blocks ``B`` of ``M`` from ``(m, k, b, b)`` factor blocks.

    ``M = blockdiag(B_0, ..., B_{G-1})`` exactly (``B_g = M[gS:(g+1)S, gS:(g+1)S]``).  Built level
    by level: ``M_0 = F_0`` is block diagonal in blocks of ``b`` (the ``Q_0j`` themselves), and
    ``M_i = F_i M_{i-1}`` is block diagonal in chunks of ``c = b 2^i``.  Inside chunk ``a``, ``F_i``
    pairs half-block ``g`` of the chunk's first half with half-block ``g`` of its second half
    (block ``a 2^i + g``, split into ``h x h`` quarters ``Q[p, q]``, ``h = b / 2``), and the two
    halves are diagonal blocks ``L_0, L_1`` of ``M_{i-1}``, so row ``(p, g, r)`` of the chunk is
    ``sum_s Q[p, q][r, s] L_q[g h + s, :]`` in column half ``q``: one small einsum per level,
    ``2 h c d`` FLOPs at level ``i``, no identity rows and no permutations.  Differentiable (its
    reverse mode is 3-5x faster on XLA:CPU than that of the factored product on ``S`` identity
    rows, BENCHMARKS.md, "train_step").
    """
    m, k, b, _ = blocks.shape
    out = blocks[0]  # (k, b, b): M_0
    h = b // 2
    for i in range(1, m):
        g = 2**i
        a, half = k // g, b * g // 2
        q = blocks[i].reshape(a, g, 2, h, 2, h)  # [a, g, p, r, q, s]
        prev = out.reshape(a, 2, g, h, half)  # [a, q, g, s, column]: the two halves of each chunk
        out = jnp.einsum("agprqs,aqgsc->apgrqc", q, prev, precision=jax.lax.Precision.HIGHEST)
        out = out.reshape(a, 2 * half, 2 * half)
    return out


def span_rows(x: jax.Array, B: jax.Array, *, transpose: bool = False, precision=None) -> jax.Array:
    """``x M`` (or ``x M^T``) for ``x (T, d)`` and ``M = blockdiag(B)``, ``B (G, S, S)``: one batched
    matmul on a ``(G, T, S)`` view (one transpose in and one out, moving ``S``-float runs)."""
    t, d = x.shape
    g, s, _ = B.shape
    xt = x.reshape(t, g, s).transpose(1, 0, 2)
    spec = "gtc,gec->gte" if transpose else "gtc,gce->gte"
    return jnp.einsum(spec, xt, B, precision=precision).transpose(1, 0, 2).reshape(t, d)


def span_cols(w: jax.Array, B: jax.Array, *, precision=None) -> jax.Array:
    """``M w`` for ``w (d, n)``, ``M = blockdiag(B)``, no transposes either way.

    ``(M w)[g S + r] = sum_c B[g, r, c] w[g S + c]``, the batched product ``B @ w.reshape(G, S, n)``
    by :func:`boft_jax.orthogonal.small_matmul`: for ``S <= 16`` ``S`` multiply-adds of contiguous
    rows of ``w`` by scalars (one fused loop; on XLA:CPU up to ~1.4x faster than the batched matmul
    at S = 8 and about even at S = 16, BENCHMARKS.md, compile_time), above one batched matmul at
    ``precision``.
    """
    d, n = w.shape
    g, s, _ = B.shape
    return small_matmul(B, w.reshape(g, s, n), precision=precision).reshape(d, n)


def rotate(
    x: jax.Array,
    blocks: jax.Array,
    n_factors: int | None = None,
    *,
    precision=None,
) -> jax.Array:
    """``x @ M`` for the butterfly rotation ``M = F_{m-1} ... F_0``, without building ``M``.

    Args:
      x: ``(..., d)`` row vectors (any leading shape; ``d = k b``).
      blocks: ``(m, k, b, b)`` orthogonal blocks, e.g. from :func:`boft_jax.cayley`; factor ``i``
        uses ``blocks[i]``.  A flat ``(m k, b, b)`` array is accepted when ``n_factors`` is given.
      n_factors: ``m``; optional, checked against ``blocks`` when given.
      precision: passed to the batched matmuls (``jax.lax.Precision``).

    Returns:
      ``(..., d)`` in ``x``'s dtype.  The product is computed in the promoted dtype of ``x`` and
      ``blocks`` (float32 blocks keep bf16 activations' rotation in float32), then cast back.
      Cost: for ``m <= 4`` (:func:`use_span`) the ``(d/S, S, S)`` diagonal blocks of ``M`` are
      built from the factors (``2 m b S d`` FLOPs, independent of the rows) and applied in one
      batched matmul, ``2 S d`` FLOPs per row with ``S = b 2^(m-1)`` (<= 2x the factored count,
      but one pass over the rows instead of ``m``: 2-2.5x faster at ``d = 4096``, ``m = 4``);
      otherwise ``m`` batched matmuls, ``2 m b d`` FLOPs per row.
    """
    blocks = _as_blocks(blocks, n_factors)
    m, k, b, _ = blocks.shape
    x = jnp.asarray(x)
    d = x.shape[-1]
    if d != k * b:
        raise ValueError(f"x has {d} features but the blocks cover k * b = {k} * {b} = {k * b}")
    _check(d, b, m)
    _real_floats(x, "x", "rotate")
    dtype = jnp.result_type(x.dtype, blocks.dtype)
    blocks = blocks.astype(dtype)
    if m > 1 and use_span(d, b, m):
        y = span_rows(x.reshape(-1, d).astype(dtype), span_blocks(blocks), precision=precision)
        return y.reshape(x.shape).astype(x.dtype)
    return _rotate_factored(x.astype(dtype), blocks, precision).astype(x.dtype)


def _real_floats(a: jax.Array, name: str, fn: str) -> None:
    """Rotations of integer (truncated back) or complex values are refused, naming the argument."""
    if not jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating):
        raise TypeError(f"{fn}: {name} must be real floating-point (e.g. float32), got dtype {jnp.asarray(a).dtype}")


def _rotate_factored(x: jax.Array, blocks: jax.Array, precision) -> jax.Array:
    """``x M`` factor by factor: ``m`` batched matmuls, ``2 m b d`` FLOPs per row."""
    for i in reversed(range(blocks.shape[0])):  # a row vector meets F_{m-1} first
        x = _factor_rows(x, blocks[i], i, precision)
    return x


def rotate_kernel(
    kernel: jax.Array,
    blocks: jax.Array,
    n_factors: int | None = None,
    *,
    precision=None,
) -> jax.Array:
    """``M @ K`` for a kernel whose first axis is the ``d`` input features (weight-centric BOFT).

    Args:
      kernel: ``(d, ...)``, e.g. a Flax Dense kernel ``(d_in, d_out)`` or a DenseGeneral kernel
        ``(d_in, heads, head_dim)``; trailing axes are carried along.
      blocks: ``(m, k, b, b)`` as for :func:`rotate`.
      n_factors: optional ``m``, checked.
      precision: passed to the batched matmuls.

    Returns:
      ``M @ K`` with ``kernel``'s shape and dtype (computed in the promoted dtype).  For every
      ``x``: ``rotate(x, blocks) @ K == x @ rotate_kernel(K, blocks)``.  Cost for ``n`` output
      features: with span blocks (:func:`use_span`) ``2 S d n`` FLOPs plus building them
      (``2 m b S d``), otherwise ``2 m b d n``.
    """
    blocks = _as_blocks(blocks, n_factors)
    m, k, b, _ = blocks.shape
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 1 or kernel.shape[0] != k * b:
        raise ValueError(
            f"kernel of shape {kernel.shape} must have its first axis equal to k * b = {k * b}"
        )
    _check(k * b, b, m)
    _real_floats(kernel, "kernel", "rotate_kernel")
    dtype = jnp.result_type(kernel.dtype, blocks.dtype)
    w = kernel.reshape(k * b, -1).astype(dtype)
    blocks = blocks.astype(dtype)
    if m > 1 and use_span(k * b, b, m):
        return span_cols(w, span_blocks(blocks), precision=precision).reshape(kernel.shape).astype(kernel.dtype)
    for i in range(m):  # M K = F_{m-1} (... (F_0 K))
        w = _factor_cols(w, blocks[i], i, precision)
    return w.reshape(kernel.shape).astype(kernel.dtype)


def rotation_matrix(blocks: jax.Array, n_factors: int | None = None) -> jax.Array:
    """Dense ``(d, d)`` rotation ``M`` — for tests, notebooks and debugging only.

    Built by the structured code itself (``M = I @ M = rotate(I, blocks)``), so it cannot drift
    from :func:`rotate`.  Never use it on a training path: it costs ``O(d^2)`` memory.
    """
    blocks = _as_blocks(blocks, n_factors)
    d = blocks.shape[1] * blocks.shape[2]
    return rotate(jnp.eye(d, dtype=blocks.dtype), blocks, precision=jax.lax.Precision.HIGHEST)


def num_layer_params(d_in: int, d_out: int, *, block_size: int, n_factors: int, bias: bool = False) -> int:
    """Trainable numbers of one BOFT layer: ``m k b(b-1)/2 + d_out`` (``+ d_out`` more with a bias).

    Example:
      >>> import boft_jax as boft
      >>> boft.num_layer_params(768, 768, block_size=8, n_factors=2)   # 2 * 96 * 28 + 768
      6144
    """
    _check(d_in, block_size, n_factors)
    return n_factors * (d_in // block_size) * num_skew_params(block_size) + d_out * (2 if bias else 1)
