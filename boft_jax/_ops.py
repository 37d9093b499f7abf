"""Fast BOFT products for the linen layers (private; the public math lives in :mod:`butterfly`).

Notation: ``x (T, d)`` token rows, frozen kernel ``K (d, n)``, scale ``s (n,)``,
``M = F_{m-1} ... F_0`` with ``k`` blocks of size ``b`` per factor.

1. ``M`` is block diagonal with dense ``S x S`` blocks, ``S = b 2^(m-1)``: factor ``i`` only mixes
   features inside chunks of ``b 2^i``, so the product of all ``m`` factors stays inside chunks of
   ``S``.  :func:`span_blocks` builds those ``G = d / S`` blocks ``B (G, S, S)`` once per call
   (``2 m b S d`` FLOPs, nothing next to a layer), and every product with ``M`` becomes *one*
   structured product instead of ``m`` permuted ones.  For ``m <= 2`` this costs the same FLOPs as
   the factored form (``S = m b``); for ``m = 4``, ``b = 8`` it costs 2x the FLOPs in one pass.
   Deeper butterflies (``2^(m-1) > 2 m``, or ``S = d``: ``M`` fully dense) keep the ``m`` factors
   instead (:func:`use_span`, :func:`rotation_operand`): every product below accepts either form,
   so no ``d x d`` array is ever built.

2. Products with ``M`` on the token side (``x M``, ``u M^T``); XLA:CPU copies a transposed
   ``(T, d)`` array at a fraction of memory bandwidth, so the transposes are kept few:

   - for ``S <= 16``, elementwise: ``(x M)[t, gS + e] = sum_c x[t, gS + c] Y[c, gS + e]`` with the
     coefficient rows ``Y[c, gS + e] = B[g, c, e]`` (:func:`_coeff_rows`): ``S`` broadcast
     multiply-adds over contiguous rows, which XLA fuses into one vectorized loop.  ``Y`` must be
     its own row-major buffer (if XLA fused the transpose that builds it into the loop, the loop
     would gather ``Y`` and run ~10x slower), so it is produced by a (tiny) matmul with the
     identity: a matmul's result is always materialized in row-major layout on XLA:CPU.
   - for larger ``S``, and in the input-centric forward pass (whose input is often an
     unmaterialized LayerNorm/GELU): one batched matmul on a ``(G, T, S)`` view (one transpose in
     and one out, moving ``S``-float runs).

3. Block gradients ``dB_g = x_g^T u_g`` (a reduction over tokens) are one batched matmul on
   ``(G, T, S')`` views of ``x`` and ``u`` (two transposes; ``S' = max(S, 16)``, see :func:`_block_grad`).

4. :func:`boft_dense` (weight-centric, a ``jax.custom_vjp``): forward ``z = x (M K)``, ``y = z s``
   (the structured product touches the ``d x n`` kernel, not the tokens); backward with
   ``u = (dy s) K^T`` (the frozen layer's own input gradient): ``dx = u M^T``, ``dB_g = x_g^T u_g``,
   ``ds = sum_t dy z``.  Autodiff of the same forward would pay a full weight gradient ``x^T dy``
   (as many FLOPs as the layer's matmul).  With an orthogonal ``M`` and ``T >= 16 n`` it keeps ``W``
   instead and takes ``dx = (dy s) W^T``, ``dB_g = (x_g^T dx_g) B_g`` (one token-side product
   fewer; :func:`keeps_rotated_kernel`).  :func:`rotate_rows` (input-centric) has the general backward
   and rotates the tokens in the forward pass.  Both are exact; the kernel's cotangent (``M^T x^T
   (dy s)``, a full matmul) is computed only when asked for (XLA drops it for a frozen kernel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from boft_jax.butterfly import rotate, rotate_kernel, span, span_blocks, span_cols, span_rows, use_span

__all__ = ["span", "use_span", "span_blocks", "rotation_operand", "rotate_rows", "rotate_kernel_any", "boft_dense",
           "keeps_rotated_kernel", "scaled", "scaled_dot"]

_EW_MAX_SPAN = 16  # elementwise token products up to this block size, batched matmuls above
_BLOCK_GRAD_MIN_SPAN = 16  # block gradients on at least 16-wide blocks (see _block_grad)
_HI = jax.lax.Precision.HIGHEST


def rotation_operand(blocks: jax.Array) -> jax.Array:
    """What the products below take for ``M``: ``(G, S, S)`` span blocks or the ``(m, k, b, b)`` factors.

    Chosen by :func:`use_span`; the products dispatch on the rank (3: span form, 4: factors).
    """
    m, k, b, _ = blocks.shape
    return span_blocks(blocks) if use_span(k * b, b, m) else blocks


# ---------------------------------------------------------------------------------------------
# Structured products
# ---------------------------------------------------------------------------------------------
def _coeff_rows(B: jax.Array, transpose: bool) -> jax.Array:
    """``Y (S, G S)``: ``Y[c, gS + e] = B[g, c, e]`` (``x M``) or ``B[g, e, c]`` (``u M^T``).

    Computed as ``I @ B`` so that XLA materializes it row-major (see the module docstring).
    """
    g, s, _ = B.shape
    eye = jnp.eye(s, dtype=B.dtype)
    spec = "cd,ged->cge" if transpose else "cd,gde->cge"
    return jnp.einsum(spec, eye, B, precision=_HI).reshape(s, g * s)


def _rows(x: jax.Array, B: jax.Array, transpose: bool, precision=None, elementwise: bool = True) -> jax.Array:
    """``x M`` (or ``x M^T``) for ``x (T, d)``, ``M = blockdiag(B)``, in the promoted dtype.

    ``elementwise=True`` (used when ``S <= 16``) reads ``x`` ``S`` times inside one fused loop, so
    ``x`` must be a materialized array (e.g. a matmul's result): XLA fuses cheap elementwise
    producers (a LayerNorm, a GELU) into the loop and would then recompute them ``S`` times.
    """
    t, d = x.shape
    g, s, _ = B.shape
    dtype = jnp.result_type(x.dtype, B.dtype)
    if elementwise and s <= _EW_MAX_SPAN:
        y = _coeff_rows(B.astype(dtype), transpose)
        xv = x.reshape(t, g, s)
        out = None
        for c in range(s):
            term = jnp.broadcast_to(xv[:, :, c : c + 1], (t, g, s)).reshape(t, d).astype(dtype) * y[c]
            out = term if out is None else out + term
        return out
    return span_rows(x.astype(dtype), B.astype(dtype), transpose=transpose, precision=precision)


def _block_grad(x: jax.Array, u: jax.Array, s: int, precision=None) -> jax.Array:
    """``dB[h] = x_h^T u_h`` (at least float32 accumulation) for ``x, u (T, d)`` seen as ``(T, G, S)``.

    One batched matmul over tokens on ``(G', T, S')`` views, ``S' = max(S, 16)`` (``S'``-float runs
    fill a 64-byte cache line in the transposes; for ``S < S'`` the diagonal ``S``-blocks of the
    ``S'``-blocks are kept, at ``S'/S`` times the (small) FLOPs).
    """
    t, d = x.shape
    sg = block_grad_width(d, s)
    gg = d // sg
    xt = x.reshape(t, gg, sg).transpose(1, 0, 2)
    ut = u.reshape(t, gg, sg).transpose(1, 0, 2)
    acc = jnp.promote_types(jnp.float32, jnp.result_type(x.dtype, u.dtype))
    db = jnp.einsum("gtr,gtc->grc", xt, ut, precision=precision, preferred_element_type=acc)
    return diagonal_blocks(db, s)


def block_grad_width(d: int, s: int) -> int:
    """``S'``, the block width :func:`_block_grad` reduces over: ``s`` doubled while below
    ``_BLOCK_GRAD_MIN_SPAN`` and ``2 S'`` still divides ``d``."""
    sg = s
    while sg < _BLOCK_GRAD_MIN_SPAN and d % (2 * sg) == 0:
        sg *= 2
    return sg


def diagonal_blocks(db: jax.Array, s: int) -> jax.Array:
    """The diagonal ``s x s`` blocks of ``(G', S', S')`` blocks, as ``(G' S' / s, s, s)`` in order."""
    gg, sg, _ = db.shape
    if sg == s:
        return db
    k = sg // s
    db = db.reshape(gg, k, s, k, s)
    return jnp.stack([db[:, i, :, i, :] for i in range(k)], axis=1).reshape(gg * k, s, s)


def _rotate_kernel(kernel: jax.Array, B: jax.Array, precision=None) -> jax.Array:
    """``M K`` for ``K (d, n)`` and span blocks ``B``, in the promoted dtype (:func:`span_cols`)."""
    dtype = jnp.result_type(kernel.dtype, B.dtype)
    return span_cols(kernel.astype(dtype), B.astype(dtype), precision=precision)


def rotate_kernel_any(kernel: jax.Array, R: jax.Array, precision=None) -> jax.Array:
    """``M K`` for ``K (d, n)``, ``R`` from :func:`rotation_operand`; promoted dtype; differentiable."""
    if R.ndim == 4:
        dtype = jnp.result_type(kernel.dtype, R.dtype)
        return rotate_kernel(kernel.astype(dtype), R, precision=precision)
    return _rotate_kernel(kernel, R, precision)


# ---------------------------------------------------------------------------------------------
# Input-centric: x -> x M
# ---------------------------------------------------------------------------------------------
def rotate_rows(x: jax.Array, R: jax.Array, precision=None) -> jax.Array:
    """``x M`` for ``x (T, d)``; ``R`` from :func:`rotation_operand`; promoted dtype.

    Span form ``R = B (G, S, S)``: one structured product, backward ``dx = g M^T``,
    ``dB_h = x_h^T g_h`` (module docstring, 2 and 3).  Factor form ``R (m, k, b, b)``:
    :func:`boft_jax.rotate` and its autodiff (``m`` structured products each way).
    """
    if R.ndim == 4:
        dtype = jnp.result_type(x.dtype, R.dtype)
        return rotate(x.astype(dtype), R, precision=precision)
    return _rotate_span_rows(x, R, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rotate_span_rows(x: jax.Array, B: jax.Array, precision=None) -> jax.Array:
    return _rows(x, B, False, precision, elementwise=False)


def _rotate_rows_fwd(x, B, precision):
    # x is the layer's input, often an unmaterialized LayerNorm/GELU: use the matmul form.
    return _rows(x, B, False, precision, elementwise=False), (x, B)


def _rotate_rows_bwd(precision, res, g):
    x, B = res
    s = B.shape[-1]
    dx = _rows(g, B, True, precision).astype(x.dtype)
    dB = _block_grad(x, g, s, precision).astype(B.dtype)
    return dx, dB


_rotate_span_rows.defvjp(_rotate_rows_fwd, _rotate_rows_bwd)


# ---------------------------------------------------------------------------------------------
# Weight-centric: y = (x (M K)) * s with a structured backward pass
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def boft_dense(x: jax.Array, kernel: jax.Array, R: jax.Array, scale: jax.Array, precision=None,
               orthogonal: bool = False) -> jax.Array:
    """``(x @ (M K)) * s`` for ``x (T, d_in)``, ``K (d_in, d_out)``, ``s (d_out,)``; ``R`` from
    :func:`rotation_operand` (span blocks ``(G, S, S)`` or factor blocks ``(m, k, b, b)``).

    Forward: ``W = M K`` (cast to ``K``'s dtype), ``y = (x W) * s`` (as :func:`scaled_dot`: one
    rounding to the promoted dtype of ``x`` and ``K``).
    Backward (exact): ``u = (dy s) K^T``, ``dx = u M^T``, ``dR`` from ``<u, x M>`` (span form:
    ``dB_g = x_g^T u_g``; factor form: the autodiff of :func:`boft_jax.rotate` with cotangent
    ``u``), ``ds = sum_t dy z``, ``dK = M^T x^T (dy s)`` (dropped by XLA when the kernel is frozen).
    No ``x^T dy`` weight gradient is computed for a frozen kernel: that matmul would cost as much as
    the layer itself.

    ``orthogonal=True`` promises ``M^T M = I`` (exact Cayley blocks; dropout's identity blocks keep
    it).  Then, in the span form with many tokens per kernel column (:func:`keeps_rotated_kernel`),
    ``W`` is kept from the forward pass and the backward pass takes ``dx = (dy s) W^T`` and
    ``dB_g = (x_g^T dx_g) B_g`` (``u = dx M``): the token-side product ``u M^T`` is gone, for a
    residual ``W`` as large as the kernel (BENCHMARKS.md, train_step, "kept rotated kernel").
    """
    return _boft_dense_fwd(x, kernel, R, scale, precision, orthogonal)[0]


_KEEP_W_TOKENS_PER_COLUMN = 16  # keep W when T >= 16 d_out: W is then at most 1/16 of a (T, d_in) activation


def keeps_rotated_kernel(tokens: int, d_out: int, R: jax.Array, orthogonal: bool) -> bool:
    """Whether :func:`boft_dense` keeps ``W = M K`` for its backward pass (see there): an orthogonal
    ``M`` in span form and ``T >= 16 d_out`` token rows, where the kernel-sized residual is small
    next to the layer's activations and saves a pass over ``T x d_in`` of them."""
    return orthogonal and R.ndim == 3 and tokens >= _KEEP_W_TOKENS_PER_COLUMN * d_out


@jax.custom_vjp
def scaled(y: jax.Array, scale: jax.Array) -> jax.Array:
    """``y * s`` (``s`` over ``y``'s trailing axes) in at least float32, rounded once to ``y``'s
    dtype: a bf16 / f16 layer keeps the learned scale's own precision (``s = 1.003`` does not round
    to 1).  Backward: ``dy * s`` and ``ds = sum dy * y`` reduced in float32, with ``y`` kept in its
    own dtype (autodiff of the float32 product would keep a float32 copy of it)."""
    return _times(y, scale)


def _times(y: jax.Array, scale: jax.Array) -> jax.Array:
    acc = jnp.promote_types(jnp.float32, y.dtype)
    return (y.astype(acc) * scale.astype(acc)).astype(y.dtype)


def _scale_grad(g: jax.Array, y: jax.Array, scale: jax.Array) -> jax.Array:
    """``ds = sum over the leading axes of g * y``, accumulated in at least float32."""
    acc = jnp.promote_types(jnp.float32, jnp.result_type(y.dtype, g.dtype))
    lead = tuple(range(y.ndim - scale.ndim))
    return jnp.sum(g.astype(acc) * y.astype(acc), axis=lead).astype(scale.dtype)


def _scaled_fwd(y, scale):
    return _times(y, scale), (y, scale)


def _scaled_bwd(res, g):
    y, scale = res
    return _times(g, scale).astype(y.dtype), _scale_grad(g, y, scale)


scaled.defvjp(_scaled_fwd, _scaled_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def scaled_dot(a: jax.Array, kernel: jax.Array, scale: jax.Array, precision=None) -> jax.Array:
    """``(a @ K) * s`` for ``a (T, d)``, ``K (d, n)``, ``s (n,)``: the product accumulated and
    scaled in at least float32 and rounded once to the operands' (promoted) dtype.

    In bf16 / f16 a plain ``a @ K`` would round to bf16 first and ``* s`` round again: a learned
    ``s = 1.003`` then moves an output only where 0.3% exceeds half a bf16 unit, so the outputs are
    biased.  Backward as for the frozen layer times ``s``: ``da = (dy s) K^T``, ``dK = a^T (dy s)``
    (dropped by XLA for a frozen kernel), ``ds = sum_t dy z`` with ``z = a @ K`` kept in the
    operands' dtype.
    """
    return _scaled_dot_fwd(a, kernel, scale, precision)[0]


def _dot_then_scale(a, kernel, scale, precision) -> tuple[jax.Array, jax.Array]:
    """``(y, z)``: ``y = (a K) s`` rounded once, and ``z = a K`` rounded, both in the operands' dtype."""
    dtype = jnp.result_type(a.dtype, kernel.dtype)
    acc = jnp.promote_types(jnp.float32, dtype)
    z = jax.lax.dot_general(a.astype(dtype), kernel.astype(dtype), (((1,), (0,)), ((), ())), precision=precision,
                            preferred_element_type=acc)
    return (z * scale.astype(acc)).astype(dtype), z.astype(dtype)


def _scaled_dot_fwd(a, kernel, scale, precision):
    y, z = _dot_then_scale(a, kernel, scale, precision)
    return y, (a, kernel, scale, z)


def _frozen_layer_grads(dy, x, kernel, z, scale, precision) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The backward pass of ``y = (x K) * s`` with ``z = x K``: ``(u, gw, ds)`` with ``u = (dy s) K^T``
    (the input's cotangent), ``gw = x^T (dy s)`` (the kernel's; XLA drops it for a frozen kernel) and
    ``ds = sum_t dy z``.  :func:`scaled_dot` returns them as they are; :func:`boft_dense` carries
    ``u`` and ``gw`` through ``M``."""
    dz = _times(dy, scale)
    u = jax.lax.dot_general(dz, kernel.astype(dz.dtype), (((1,), (1,)), ((), ())), precision=precision)
    gw = jax.lax.dot_general(x, dz.astype(x.dtype), (((0,), (0,)), ((), ())), precision=precision)
    return u, gw, _scale_grad(dy, z, scale)


def _scaled_dot_bwd(precision, res, g):
    a, kernel, scale, z = res
    da, dk, ds = _frozen_layer_grads(g, a, kernel, z, scale, precision)
    return da.astype(a.dtype), dk.astype(kernel.dtype), ds


scaled_dot.defvjp(_scaled_dot_fwd, _scaled_dot_bwd)


def _boft_dense_fwd(x, kernel, R, scale, precision, orthogonal):
    w = rotate_kernel_any(kernel, R, precision).astype(kernel.dtype)
    y, z = _dot_then_scale(x, w, scale, precision)
    kept = w if keeps_rotated_kernel(x.shape[0], kernel.shape[1], R, orthogonal) else None
    return y, (x, kernel, R, scale, z, kept)


def _boft_dense_bwd(precision, orthogonal, res, dy):
    x, kernel, B, scale, z, w = res
    if w is not None:  # M orthogonal, span form: the input gradient through W is u M^T itself, and u = dx M
        dx, gw, ds = _frozen_layer_grads(dy, x, w, z, scale, precision)
        c = _block_grad(x, dx, B.shape[-1], precision)
        dB = jnp.einsum("gij,gjk->gik", c, B.astype(c.dtype), precision=_HI).astype(B.dtype)
        dK = _rotate_kernel(gw, jnp.swapaxes(B, 1, 2), precision).astype(kernel.dtype)
        return dx.astype(x.dtype), dK, dB, ds
    u, gw, ds = _frozen_layer_grads(dy, x, kernel, z, scale, precision)
    if B.ndim == 4:  # factor form: the structured autodiff of rotate / rotate_kernel
        dtype = jnp.result_type(x.dtype, B.dtype)
        _, pull = jax.vjp(lambda x, B: rotate(x, B, precision=precision), x.astype(dtype), B)
        dx, dB = pull(u.astype(dtype))
        _, pull_k = jax.vjp(lambda k: rotate_kernel(k, B, precision=precision), kernel.astype(dtype))
        (dK,) = pull_k(gw.astype(dtype))
        return dx.astype(x.dtype), dK.astype(kernel.dtype), dB.astype(B.dtype), ds
    s = B.shape[-1]
    dx = _rows(u, B, True, precision).astype(x.dtype)
    dB = _block_grad(x, u, s, precision).astype(B.dtype)
    dK = _rotate_kernel(gw, jnp.swapaxes(B, 1, 2), precision).astype(kernel.dtype)
    return dx, dK, dB, ds


boft_dense.defvjp(_boft_dense_fwd, _boft_dense_bwd)
