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
    "solve_identity_plus_skew",
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


_HIGHEST = jax.lax.Precision.HIGHEST
_EW_MAX_BLOCK = 16  # small_matmul: broadcast multiply-adds up to this size, a batched matmul above


def small_matmul(a: jax.Array, c: jax.Array, *, precision=_HIGHEST) -> jax.Array:
    """``a @ c`` for batches of small matrices ``(..., p, q) @ (..., q, r)`` (leading axes broadcast).

    Up to ``q = 16`` the product is ``q`` broadcast multiply-adds in the inputs' dtype, which XLA
    fuses into one loop; above, one batched matmul at ``precision`` (default ``HIGHEST``).  On
    XLA:CPU a batched ``dot`` over many tiny matrices pays a per-matrix overhead: for 1536 blocks
    of 8 x 8 the multiply-adds measured 0.13 ms against 0.30 ms.  Only the forward pass is fast: its reverse
    mode (slices transpose to pads) is not, which is why the Cayley map's derivative supplies its
    own transpose (:func:`_cayley_exact_jvp`), and chains of it can be slower than matmuls (the
    Neumann series keeps batched matmuls, at HIGHEST precision: 3-6x faster there).

    >>> import jax.numpy as jnp
    >>> a, c = jnp.arange(8.0).reshape(2, 2, 2), jnp.ones((2, 2, 3))
    >>> bool(jnp.array_equal(small_matmul(a, c), a @ c))
    True
    """
    if a.shape[-1] > _EW_MAX_BLOCK:
        return jnp.matmul(a, c, precision=precision)
    out = a[..., :, 0, None] * c[..., None, 0, :]
    for k in range(1, a.shape[-1]):
        out = out + a[..., :, k, None] * c[..., None, k, :]
    return out


def _elimination_step(j, carry):
    """Gauss-Jordan step ``j`` on ``[A | X]`` (without pivoting): rows ``!= j`` lose their multiple
    of the pivot row, row ``j`` becomes the pivot row divided by the pivot."""
    a, x = carry
    b = a.shape[-1]
    piv = jnp.take(jnp.take(a, j, axis=-2), j, axis=-1)[..., None]
    row_a, row_x = jnp.take(a, j, axis=-2) / piv, jnp.take(x, j, axis=-2) / piv
    # Row i != j loses f_i times the pivot row; row j is replaced by the pivot row (selected, not
    # computed as row_j - (pivot - 1) row, which is zero once pivot - 1 rounds to the pivot: pivots
    # grow like 1 + |S|^2, and a 2 x 2 block at entries ~1e4 rotated the wrong way in float32).
    f = jnp.take(a, j, axis=-1)
    at_j = (jnp.arange(b) == j)[:, None]
    return (jnp.where(at_j, row_a[..., None, :], a - f[..., :, None] * row_a[..., None, :]),
            jnp.where(at_j, row_x[..., None, :], x - f[..., :, None] * row_x[..., None, :]))


def _identity_plus_skew_and_eye(skew: jax.Array) -> tuple[jax.Array, jax.Array]:
    b = skew.shape[-1]
    eye = jnp.eye(b, dtype=skew.dtype)
    return eye + skew, jnp.broadcast_to(eye, skew.shape)


_UNROLL_MAX_BLOCK = 64  # _invert_identity_plus_skew: unrolled on GPUs up to this block size


def _invert_loop(skew: jax.Array) -> jax.Array:
    """``(I + S)^(-1)``: the ``b`` elimination steps as a ``fori_loop`` (one compiled step)."""
    return jax.lax.fori_loop(0, skew.shape[-1], _elimination_step, _identity_plus_skew_and_eye(skew))[1]


def _invert_unrolled(skew: jax.Array) -> jax.Array:
    """``(I + S)^(-1)``: the same ``b`` elimination steps, unrolled (no device loop)."""
    carry = _identity_plus_skew_and_eye(skew)
    for j in range(skew.shape[-1]):
        carry = _elimination_step(j, carry)
    return carry[1]


@jax.jit  # compiled once per shape, also when called eagerly (a bare fori_loop would recompile its fresh closure every call)
def _invert_identity_plus_skew(skew: jax.Array) -> jax.Array:
    """``(I + S)^(-1)`` by Gauss-Jordan elimination on ``[I + S | I]`` without pivoting.

    The same steps either way; the form depends on the platform the program is lowered for:

    - CPU: a ``fori_loop``, the same run time as ``b`` unrolled steps and 2-3x less compile time
      per call site (a transformer has one call site per adapted layer).
    - CUDA / ROCm: unrolled up to ``b = 64`` (:data:`_UNROLL_MAX_BLOCK`).  On an H200 one
      adapter's construction (forward + backward, ``m k`` blocks of 8 x 8) took 244-288 us with the
      loop and 45-95 us unrolled, and chains of adapted layers compiled faster unrolled
      (BENCHMARKS.md, train_step on a GPU).  The unrolled program grows with ``b``: for larger
      blocks (OFT with ``block_num=1`` has ``b = d_in``, hundreds of steps per layer) the loop
      keeps compile time bounded.
    - Other platforms (TPU): the loop, which runs on the device there.
    """
    if skew.shape[-1] > _UNROLL_MAX_BLOCK:
        return _invert_loop(skew)
    return jax.lax.platform_dependent(skew, cuda=_invert_unrolled, rocm=_invert_unrolled, default=_invert_loop)


def _refined(skew: jax.Array, rhs: jax.Array, x: jax.Array, inverse: jax.Array) -> jax.Array:
    """One step of iterative refinement of ``X ~ (I + S)^(-1) R``: ``X + (I + S)^(-1) (R - X - S X)``.

    Two small products, no second elimination.  The last one is a ``jnp.matmul``, not
    :func:`small_matmul`: XLA:CPU fuses a multiply-add loop into a consumer multiply-add loop and
    would recompute the residual ``b`` times (it drops optimization barriers before fusion),
    whereas a dot's operands are materialized.
    """
    return x + jnp.matmul(inverse, rhs - x - small_matmul(skew, x), precision=_HIGHEST)


def solve_identity_plus_skew(skew: jax.Array, rhs: jax.Array, *, refine: int = 1) -> jax.Array:
    """``X = (I + S)^(-1) R`` for skew-symmetric ``S (..., b, b)`` and ``R (..., b, n)``: a batched solve.

    Gauss-Jordan elimination on ``[I + S | I]`` without pivoting gives ``(I + S)^(-1)``, then
    ``X = (I + S)^(-1) R`` and ``refine`` steps of iterative refinement by products
    (``X += (I + S)^(-1) (R - (I + S) X)``), all with elementwise array ops and small batched
    matmuls, so it lowers to a few fused loops on every backend (the ``b`` elimination steps as a
    device loop on CPU and TPU, unrolled on CUDA and ROCm up to ``b = 64``, where the loop measured
    3-5.5x slower at ``b = 8``).

    No pivoting is needed to avoid a zero pivot: the symmetric part of ``A = I + S`` is ``I``
    (``x^T A x = |x|^2``), so every leading principal submatrix is invertible and every pivot has
    magnitude ``>= 1`` in exact arithmetic.  But the Schur complements grow like ``|S|^2``, so the
    first solve loses about ``|S|`` more digits than a pivoted LU; one refinement step recovers them
    up to entries of about 100: the Cayley map computed this way (:func:`cayley`) is then within
    ``eps (1 + ||S||_2)`` of the exact blocks in float32, about as accurate as LAPACK's pivoted
    ``getrf``/``getrs`` (tests; 1-3e-5 there).  Beyond, float32 blocks degrade (measured over 200
    fresh blocks): odd ``b`` 1e-2 to 1e-1 off at entries ~1e3; even ``b`` (every block when
    ``m > 1``) 1e-5 to 3e-3 off at ~1e3 and ~1e4 with XLA's default flags, but with other
    compile flags (no LLVM optimization) 2e-3 at ~1e3 and NaN at ~1e4.  A pivoted loop fixes all
    of it but made the m = 4 ViT-B train step 1.34-1.39x LoRA's instead of 1.19-1.24x (measured
    2026-12-03), for adapters no training reaches: trained BOFT blocks have entries far below 1.
    Compute in float64 (x64) if yours do not.

    Why not ``jnp.linalg.solve``: on XLA:CPU (jax 0.10) it lowers to LAPACK custom calls (plus a
    pivot loop) per call site, and programs with many call sites (a transformer with BOFT on every
    projection) deadlocked in XLA:CPU's concurrency-optimized scheduler: a 2-layer ViT-B forward
    with BOFT on q, k, v, out, fc1 and fc2 never returned, every thread idle
    (``--xla_cpu_enable_concurrency_optimized_scheduler=false`` also avoids it).  The same programs
    with this elimination (a plain loop of fused elementwise steps, no custom calls) run.  It is
    also 1-3x faster than those library calls for BOFT's small blocks.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import boft_jax as boft
      >>> a = jax.random.normal(jax.random.key(0), (5, 4, 4))
      >>> s = a - jnp.swapaxes(a, -1, -2)
      >>> x = boft.solve_identity_plus_skew(s, jnp.eye(4) - s)
      >>> bool(jnp.allclose((jnp.eye(4) + s) @ x, jnp.eye(4) - s, atol=1e-5))
      True
    """
    skew, rhs = jnp.asarray(skew), jnp.asarray(rhs)
    if skew.ndim < 2 or skew.shape[-1] != skew.shape[-2] or rhs.shape[-2] != skew.shape[-1]:
        raise ValueError(f"solve_identity_plus_skew needs (..., b, b) skew and (..., b, n) rhs, got {skew.shape} and {rhs.shape}")
    rhs = rhs.astype(skew.dtype)
    inverse = _invert_identity_plus_skew(skew)
    x = jnp.matmul(inverse, rhs, precision=_HIGHEST)
    for _ in range(refine):
        x = _refined(skew, rhs, x, inverse)
    return x


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _cayley_exact(packed: jax.Array, block_size: int) -> jax.Array:
    """``Q = (I + S)^(-1) (I - S)`` for packed skew ``S`` (``(..., b(b-1)/2)``), with a closed-form
    derivative (see :func:`_cayley_exact_jvp`).

    :func:`solve_identity_plus_skew` with the right-hand side ``I - S``, one product saved:
    ``Q_0 = 2 (I + S)^(-1) - I`` (``I - S = 2 I - (I + S)``), then its one refinement step
    (:func:`_refined`).  One elimination instead of the two of a solve refined by a second solve:
    per layer 1.2-1.5x less construction time (BENCHMARKS.md, train_step).
    """
    s = unpack_skew(packed, block_size)
    return _cayley_from(s, _invert_identity_plus_skew(s))


def _cayley_from(s: jax.Array, inverse: jax.Array) -> jax.Array:
    """``Q = 2 (I + S)^(-1) - I`` from the eliminated inverse, refined once (:func:`_refined`)."""
    eye = jnp.eye(s.shape[-1], dtype=s.dtype)
    return _refined(s, eye - s, 2.0 * inverse - eye, inverse)


@_cayley_exact.defjvp
def _cayley_exact_jvp(block_size, primals, tangents):
    """``dQ = -1/2 P dS P`` with ``P = Q + I = 2 (I + S)^(-1)``, through ``lax.custom_linear_solve``.

    ``Q = 2 (I + S)^(-1) - I``, so ``dQ = -2 A^(-1) dS A^(-1)`` with ``A = I + S`` and
    ``A^(-1) = P / 2``: two small products instead of differentiating through the elimination.
    Equivalently ``dQ`` solves the linear system ``-1/2 A dQ A = dS``, and that is how it is written:
    ``custom_linear_solve`` takes the solution (``-1/2 P dS P``) and its transpose (``-1/2 P^T C
    P^T``, used in reverse mode) as given, so both directions run as forward-form small products.
    JAX's own transpose of the tangent map (slices, pads and transposed batched dots) is 3-4x
    slower on XLA:CPU (reverse pass for 1536 blocks of 8 x 8: about 1.2 ms against 3.2-3.8 ms).
    Forward mode, reverse mode and higher derivatives all work (tests: ``check_grads`` to second
    order, Hessians and Hessian-vector products against autodiff of a float64 solve).
    """
    (packed,), (dpacked,) = primals, tangents
    s = unpack_skew(packed, block_size)
    eye = jnp.eye(block_size, dtype=s.dtype)
    inverse = _invert_identity_plus_skew(s)
    q = _cayley_from(s, inverse)  # what _cayley_exact gives
    # P = 2 (I + S)^(-1) from the refined inverse, not Q + I: for large skews Q is close to -I and
    # Q + I would cancel (median relative gradient error at skew entries ~100: 5.7e-5 that way,
    # 1.2e-5 this way, 1.5e-3 with the unrefined inverse).  Costs two small products: value_and_grad
    # of 1536 blocks of 8 x 8 took 2.6-2.7 ms against 2.3 ms (CPU), once per step, not per token.
    p = 2.0 * _refined(s, eye, inverse, inverse)
    a = eye + s
    pt = jnp.swapaxes(p, -1, -2)
    dq = jax.lax.custom_linear_solve(
        lambda y: -0.5 * small_matmul(small_matmul(a, y), a),
        _unpack_linear(dpacked, block_size),
        solve=lambda _, y: -0.5 * small_matmul(small_matmul(p, y), p),
        transpose_solve=lambda _, c: -0.5 * small_matmul(small_matmul(pt, c), pt),
    )
    return q, dq


@functools.lru_cache(maxsize=None)
def _unpack_matrix(block_size: int) -> np.ndarray:
    """``E (b(b-1)/2, b*b)`` with ``unpack_skew(p) == (p @ E).reshape(b, b)``: entries 0 and +-1."""
    b = block_size
    rows, cols = np.triu_indices(b, k=1)
    e = np.zeros((rows.size, b * b), np.float32)
    e[np.arange(rows.size), rows * b + cols] = 1.0
    e[np.arange(rows.size), cols * b + rows] = -1.0
    return e


def _unpack_linear(packed: jax.Array, block_size: int) -> jax.Array:
    """:func:`unpack_skew` for tangents: up to ``b = 16`` one matmul with the constant ``E``
    (:func:`_unpack_matrix`), exact at ``Precision.HIGHEST`` (one nonzero term per output), whose
    transpose in reverse mode is again a matmul; the gather form's transpose is a scatter-add,
    4-5x slower on XLA:CPU.  Above ``b = 16`` ``E`` grows as ``b^4``, so the gather form is used.
    """
    b = block_size
    if b > _EW_MAX_BLOCK:
        return unpack_skew(packed, b)
    e = jnp.asarray(_unpack_matrix(b), packed.dtype)
    flat = jnp.matmul(packed, e, precision=_HIGHEST)
    return flat.reshape(*packed.shape[:-1], b, b)


@functools.lru_cache(maxsize=None)
def _upper_index(block_size: int) -> np.ndarray:
    """(b, b) int array: 1 + position in the packed vector for i < j, else 0 (a zero slot)."""
    b = block_size
    idx = np.zeros((b, b), dtype=np.int32)
    rows, cols = np.triu_indices(b, k=1)
    idx[rows, cols] = np.arange(1, rows.size + 1, dtype=np.int32)
    return idx


def _packed_block_size(packed: jax.Array, block_size: int | None) -> int:
    """``b`` of packed skew parameters ``(..., b(b-1)/2)``; checked against ``block_size`` when given."""
    b = block_size_from_num_params(packed.shape[-1])
    if block_size is not None and block_size != b:
        raise ValueError(
            f"packed skew parameters have a last axis of {packed.shape[-1]} = b(b-1)/2 for b = {b},"
            f" but block_size = {block_size} was given (expects a last axis of"
            f" {num_skew_params(block_size)})"
        )
    return b


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
    b = _packed_block_size(packed, block_size)
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
      method: ``"exact"`` solves ``(I + S) Q = I - S`` (``I - S`` and ``(I + S)^(-1)`` commute, so
        this is the Cayley map): ``Q_0 = 2 (I + S)^(-1) - I`` from one batched elimination without
        pivoting (as in :func:`solve_identity_plus_skew`), then one step of iterative refinement,
        about as accurate as a pivoted LAPACK solve in float32; its derivative is the closed form
        ``dQ = -1/2 (Q + I) dS (Q + I)``.
        ``"neumann"`` replaces ``(I + S)^(-1)`` by the truncated series ``sum_{j<n} (-S)^j``
        (``n = neumann_terms``): cheaper, only approximately orthogonal, accurate while
        ``||S|| < 1``, and it rotates in the same direction as the exact map (it converges to it as
        ``n`` grows).
      neumann_terms: number of series terms ``n >= 1`` for ``method="neumann"``.

    Returns:
      ``(..., b, b)`` blocks; ``Q = I`` at ``params = 0``.
    """
    params = jnp.asarray(params)
    if jnp.issubdtype(params.dtype, jnp.complexfloating):
        raise TypeError(f"cayley needs real params, got dtype {params.dtype} (the imaginary part would be dropped)")
    dtype = jnp.float64 if params.dtype == jnp.float64 else jnp.float32
    params = params.astype(dtype)
    b = _packed_block_size(params, block_size)
    if method == "exact":
        return _cayley_exact(params, b)
    s = unpack_skew(params, b)
    eye = jnp.eye(b, dtype=dtype)
    if method == "neumann":
        if isinstance(neumann_terms, bool) or not isinstance(neumann_terms, (int, np.integer)) or neumann_terms < 1:
            raise ValueError(f"neumann_terms must be an integer >= 1, got {neumann_terms!r}")
        # sum_{j<n} (-S)^j by Horner's rule: T <- I - S T, n-1 times.
        series = jnp.broadcast_to(eye, s.shape)
        for _ in range(neumann_terms - 1):
            series = eye - jnp.matmul(s, series, precision=_HIGHEST)
        return jnp.matmul(eye - s, series, precision=_HIGHEST)
    raise ValueError(f"cayley method must be 'exact' or 'neumann', got {method!r}")
