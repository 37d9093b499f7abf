"""boft_jax._ops: the fast products and their custom VJPs agree with plain autodiff of the definition."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import boft_jax as boft
from boft_jax import _ops

# (d_in, d_out, b, m): S = b 2^(m-1) covers the elementwise (S <= 16) and matmul (S > 16) span
# paths, and the factor-by-factor path (m = 5: S = 64 = d; m = 6: 2^(m-1) > 2m).
SHAPES = [(16, 12, 4, 1), (32, 24, 4, 2), (64, 40, 8, 1), (64, 48, 8, 2), (64, 16, 4, 3), (128, 24, 8, 3),
          (128, 32, 8, 4), (64, 24, 4, 5), (256, 20, 2, 6)]


def test_use_span_rule():
    assert _ops.use_span(768, 8, 1) and _ops.use_span(768, 8, 4) and _ops.use_span(64, 8, 3)
    assert not _ops.use_span(64, 4, 5)  # 2^4 / 5 > 2
    assert not _ops.use_span(64, 8, 4)  # S = 64 = d: M would be one dense d x d block
    assert _ops.use_span(16, 16, 1)  # m = 1 with one block: the block itself


def _random(d, n, b, m, tokens=7, seed=0, dtype=jnp.float64):
    keys = jax.random.split(jax.random.key(seed), 5)
    k = d // b
    skew = 0.4 * jax.random.normal(keys[0], (m, k, b * (b - 1) // 2), dtype)
    x = jax.random.normal(keys[1], (tokens, d), dtype)
    kernel = jax.random.normal(keys[2], (d, n), dtype) / np.sqrt(d)
    scale = 1.0 + 0.3 * jax.random.normal(keys[3], (n,), dtype)
    target = jax.random.normal(keys[4], (tokens, n), dtype)
    return skew, x, kernel, scale, target


def _reference(skew, x, kernel, scale):
    """The definition: y = ((x M) K) * s with M from the public structured rotation."""
    blocks = boft.cayley(skew)
    return (boft.rotate(x, blocks) @ kernel) * scale


@pytest.mark.parametrize("d,n,b,m", SHAPES)
def test_span_blocks_are_the_diagonal_blocks_of_M(d, n, b, m):
    with jax.enable_x64(True):
        skew, *_ = _random(d, n, b, m)
        blocks = boft.cayley(skew)
        B = _ops.span_blocks(blocks)
        s = _ops.span(b, m)
        assert B.shape == (d // s, s, s)
        M = np.asarray(boft.rotation_matrix(blocks))
        dense = np.zeros_like(M)
        for g in range(d // s):
            dense[g * s : (g + 1) * s, g * s : (g + 1) * s] = B[g]
        np.testing.assert_allclose(dense, M, atol=1e-12)  # M is exactly block diagonal in S-blocks


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("d,n,b,m", SHAPES)
def test_rows_products(d, n, b, m, transpose):
    with jax.enable_x64(True):
        skew, x, *_ = _random(d, n, b, m)
        blocks = boft.cayley(skew)
        M = boft.rotation_matrix(blocks)
        got = _ops._rows(x, _ops.span_blocks(blocks), transpose)
        np.testing.assert_allclose(got, x @ (M.T if transpose else M), atol=1e-12)
        # the kernel side
        kernel = jax.random.normal(jax.random.key(1), (d, n), x.dtype)
        np.testing.assert_allclose(_ops._rotate_kernel(kernel, _ops.span_blocks(blocks)), M @ kernel, atol=1e-12)


@pytest.mark.parametrize("mode", ["weight", "weight kept", "input"])
@pytest.mark.parametrize("d,n,b,m", SHAPES)
def test_custom_vjps_match_autodiff_of_the_definition(d, n, b, m, mode):
    """Value and gradients w.r.t. every input (x, kernel, skew, scale), float64, random non-identity.

    "weight kept": an orthogonal M and 16 token rows per kernel column, where the span form keeps
    ``W = M K`` for the backward pass (``dx = dz W^T``, ``dB_g = (x_g^T dx_g) B_g``)."""
    tokens = 16 * n if mode == "weight kept" else 7
    with jax.enable_x64(True):
        skew, x, kernel, scale, target = _random(d, n, b, m, tokens=tokens, seed=d + n + m)

        def fast(skew, x, kernel, scale):
            B = _ops.rotation_operand(boft.cayley(skew))
            assert B.ndim == (3 if _ops.use_span(d, b, m) else 4)
            if mode == "weight kept":
                assert _ops.keeps_rotated_kernel(tokens, n, B, True) == (B.ndim == 3)
                assert not _ops.keeps_rotated_kernel(tokens, n, B, False)
                assert not _ops.keeps_rotated_kernel(tokens - 1, n, B, True)
                y = _ops.boft_dense(x, kernel, B, scale, None, True)
            elif mode == "weight":
                assert not _ops.keeps_rotated_kernel(tokens, n, B, True)
                y = _ops.boft_dense(x, kernel, B, scale)
            else:
                y = (_ops.rotate_rows(x, B) @ kernel) * scale
            return jnp.sum(jnp.sin(y - target))  # non-linear, so dy depends on y

        def ref(skew, x, kernel, scale):
            return jnp.sum(jnp.sin(_reference(skew, x, kernel, scale) - target))

        args = (skew, x, kernel, scale)
        # jitted: one compile per function instead of op-by-op dispatch (4-8x faster here)
        np.testing.assert_allclose(jax.jit(fast)(*args), jax.jit(ref)(*args), rtol=1e-12)
        g_fast = jax.jit(jax.grad(fast, argnums=(0, 1, 2, 3)))(*args)
        g_ref = jax.jit(jax.grad(ref, argnums=(0, 1, 2, 3)))(*args)
        for name, a, r in zip(("skew", "x", "kernel", "scale"), g_fast, g_ref):
            np.testing.assert_allclose(a, r, rtol=1e-9, atol=1e-11, err_msg=name)


@pytest.mark.parametrize("d,n,b,m", [(32, 24, 4, 2), (64, 16, 4, 3), (128, 32, 8, 4), (64, 12, 4, 5)])
def test_check_grads_first_and_second_order_free(d, n, b, m):
    """jax.test_util.check_grads (reverse mode, numerical differences) on the custom VJPs."""
    with jax.enable_x64(True):
        skew, x, kernel, scale, _ = _random(d, n, b, m, tokens=5, seed=3)
        B = _ops.rotation_operand(boft.cayley(skew))
        check_grads(lambda x, k, B, s: _ops.boft_dense(x, k, B, s), (x, kernel, B, scale), order=1, modes=["rev"])
        check_grads(lambda x, B: _ops.rotate_rows(x, B), (x, B), order=1, modes=["rev"])


def test_float32_and_bfloat16_inputs():
    """Adapter math in float32 for low-precision activations; results close to float64."""
    d, n, b, m = 64, 48, 8, 2
    skew, x, kernel, scale, _ = _random(d, n, b, m, dtype=jnp.float32)
    B = _ops.span_blocks(boft.cayley(skew))
    with jax.enable_x64(True):
        ref = np.asarray(_reference(*(jnp.asarray(a, jnp.float64) for a in (skew, x, kernel, scale))))
    y32 = _ops.boft_dense(x, kernel, B, scale)
    assert y32.dtype == jnp.float32
    np.testing.assert_allclose(y32, ref, rtol=1e-4, atol=1e-5)
    y16 = _ops.boft_dense(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), B, scale)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), ref, atol=0.05 * np.abs(ref).max())
    g = jax.grad(lambda x: jnp.sum(_ops.boft_dense(x, kernel.astype(jnp.bfloat16), B, scale).astype(jnp.float32)))(
        x.astype(jnp.bfloat16)
    )
    assert g.dtype == jnp.bfloat16


def _units(v: np.ndarray, dtype) -> np.ndarray:
    """The spacing of ``dtype`` numbers at each ``|v|`` (subnormals included)."""
    fi = jnp.finfo(dtype)
    tiny = float(fi.smallest_subnormal)
    return np.maximum(2.0 ** (np.floor(np.log2(np.maximum(np.abs(v), tiny))) - fi.nmant), tiny)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_product_and_scale_are_rounded_once(dtype):
    """In bf16 / f16, ``(a K) s`` (input side) and ``(x (M K)) s`` (weight side) are within half a
    unit of the float64 product of the same low-precision operands: the scale is applied to the
    float32 product, not to a product already rounded to bf16 (rounding twice misses by up to a
    whole unit, and biases the outputs when ``s`` is within a few units of 1)."""
    rng = np.random.default_rng()
    t, d, n, b, m = 384, 64, 48, 8, 2
    a = jnp.asarray(rng.standard_normal((t, d)), dtype)
    kernel = jnp.asarray(rng.standard_normal((d, n)) / 8, dtype)
    scale = jnp.asarray(1 + 0.004 * rng.standard_normal(n), jnp.float32)
    skew = jnp.asarray(0.3 * rng.standard_normal((m, d // b, b * (b - 1) // 2)), jnp.float32)
    B = _ops.span_blocks(boft.cayley(skew))
    w = _ops.rotate_kernel_any(kernel, B).astype(dtype)  # what the weight side multiplies by
    f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731
    for y, k in [(_ops.scaled_dot(a, kernel, scale), kernel), (_ops.boft_dense(a, kernel, B, scale), w)]:
        assert y.dtype == dtype
        ref = (f64(a) @ f64(k)) * f64(scale)
        # the float32 accumulation's worst case (d terms, unit roundoff 2^-24) on top of one rounding
        accumulation = d * 2.0**-24 * (np.abs(f64(a)) @ np.abs(f64(k))) * np.abs(f64(scale))
        err = (np.abs(f64(y) - ref) - accumulation) / _units(ref, dtype)
        assert err.max() <= 0.5, err.max()
        assert np.mean(np.abs(f64(y) - ref) / _units(ref, dtype) > 0.5) < 0.01  # (twice: about 1 in 4)


@pytest.mark.parametrize("kept", [False, True])
@pytest.mark.parametrize("d,n,b,m", [(64, 48, 8, 1), (64, 48, 4, 5), (128, 24, 8, 4)])
def test_frozen_kernel_costs_no_weight_gradient(d, n, b, m, kept):
    """With the kernel not differentiated, the compiled backward has no d_in x d_out matmul (also
    when the rotated kernel is kept for the backward pass)."""
    tokens = 16 * n if kept else 32
    skew, x, kernel, scale, _ = _random(d, n, b, m, tokens=tokens, dtype=jnp.float32)
    B = _ops.rotation_operand(boft.cayley(skew))
    assert _ops.keeps_rotated_kernel(tokens, n, B, kept) == (kept and B.ndim == 3)

    def loss(x, B, s, kernel):
        return jnp.sum(_ops.boft_dense(x, kernel, B, s, None, kept) ** 2)

    def dots(argnums):
        hlo = jax.jit(jax.grad(loss, argnums=argnums)).lower(x, B, scale, kernel).compile().as_text()
        return [ln for ln in hlo.splitlines() if " dot(" in ln]

    frozen, full = dots((0, 1, 2)), dots((0, 1, 2, 3))
    weight_grad = f"f32[{d},{n}]{{1,0}} dot("  # x^T (dy s): a T x d_in x d_out matmul
    assert not any(weight_grad in ln for ln in frozen), frozen
    assert any(weight_grad in ln for ln in full), full


def test_vmap_over_adapters():
    d, n, b, m = 32, 24, 4, 2
    skew, x, kernel, scale, _ = _random(d, n, b, m, dtype=jnp.float32)
    skews = jnp.stack([skew, 2 * skew, -skew])
    f = jax.jit(lambda sk: _ops.boft_dense(x, kernel, _ops.span_blocks(boft.cayley(sk)), scale))
    ys = jax.jit(jax.vmap(f))(skews)
    for i in range(3):
        np.testing.assert_allclose(ys[i], f(skews[i]), rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda sk: jnp.sum(f(sk) ** 2))
    gs = jax.jit(jax.vmap(grad))(skews)
    np.testing.assert_allclose(gs[1], jax.jit(grad)(skews[1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("d,n,b,m", [(64, 8, 8, 1), (128, 12, 8, 3), (128, 8, 8, 4)])
def test_kept_rotated_kernel_backward_in_float32_and_bfloat16(d, n, b, m):
    """The kept-``W`` backward (which uses ``M^T M = I``) against the general one, float32 rotations
    from the exact Cayley map with large skew entries, and in bf16 against float64."""
    tokens = 16 * n
    skew, x, kernel, scale, target = _random(d, n, b, m, tokens=tokens, seed=11, dtype=jnp.float32)
    skew = skew * 3  # far from the identity: orthogonality only to float32 rounding

    def loss(skew, x, scale, kept, dtype):
        B = _ops.rotation_operand(boft.cayley(skew))
        assert _ops.keeps_rotated_kernel(tokens, n, B, kept) == kept
        y = _ops.boft_dense(x.astype(dtype), kernel.astype(dtype), B, scale, None, kept)
        return jnp.sum(jnp.sin(y.astype(jnp.float32) - target))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=(3, 4))
    kept, general = grad(skew, x, scale, True, jnp.float32), grad(skew, x, scale, False, jnp.float32)
    for name, a, r in zip(("skew", "x", "scale"), kept, general):
        np.testing.assert_allclose(a, r, rtol=2e-5, atol=2e-5 * float(np.abs(r).max()), err_msg=name)
    with jax.enable_x64(True):
        ref = jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(a, jnp.float64) for a in (skew, x, scale)), False,
                                                 jnp.float64)
    bf = grad(skew, x, scale, True, jnp.bfloat16)
    for name, a, r in zip(("skew", "x", "scale"), bf, ref):
        r = np.asarray(r)
        assert np.abs(np.asarray(a, np.float64) - r).max() <= 0.05 * np.abs(r).max(), name
