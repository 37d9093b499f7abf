"""Packed skew blocks and the Cayley map, against numpy float64 formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import boft_jax as boft
from reference import lowered_for
from reference import np_skew_from_packed as np_skew


def np_cayley(s: np.ndarray) -> np.ndarray:
    """The published formula, with an explicit inverse: Q = (I - S)(I + S)^-1."""
    eye = np.eye(s.shape[-1])
    return (eye - s) @ np.linalg.inv(eye + s)


@pytest.mark.parametrize("b", [1, 2, 3, 8, 16])
def test_unpack_is_skew_and_inverts_pack(b):
    rng = np.random.default_rng(b)
    packed = rng.normal(size=(2, 3, b * (b - 1) // 2))
    with jax.enable_x64(True):
        s = np.asarray(boft.unpack_skew(jnp.asarray(packed), b))
        np.testing.assert_array_equal(s, np_skew(packed, b))
        np.testing.assert_array_equal(s, -np.swapaxes(s, -1, -2))
        np.testing.assert_allclose(np.asarray(boft.pack_skew(jnp.asarray(s))), packed, atol=0)


def test_pack_matches_peft_skew_part_of_full_matrix():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 5, 6, 6))  # PEFT stores full (m, k, b, b) matrices
    with jax.enable_x64(True):
        s = np.asarray(boft.unpack_skew(boft.pack_skew(jnp.asarray(a))))
    np.testing.assert_allclose(s, 0.5 * (a - np.swapaxes(a, -1, -2)), atol=1e-15)


def test_bad_packed_sizes_raise():
    with pytest.raises(ValueError, match="b\\(b-1\\)/2"):
        boft.unpack_skew(jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match="block_size = 5"):
        boft.cayley(jnp.zeros((3, 6)), block_size=5)
    with pytest.raises(ValueError, match="'exact' or 'neumann'"):
        boft.cayley(jnp.zeros((3, 6)), method="pade")
    with pytest.raises(ValueError, match="neumann_terms"):
        boft.cayley(jnp.zeros((3, 6)), method="neumann", neumann_terms=0)


@pytest.mark.parametrize("b", [2, 4, 8, 32])
def test_cayley_matches_published_formula_float64(b):
    rng = np.random.default_rng(10 + b)
    packed = rng.normal(size=(3, 4, b * (b - 1) // 2))
    with jax.enable_x64(True):
        q = np.asarray(boft.cayley(jnp.asarray(packed), b))
    ref = np_cayley(np_skew(packed, b))
    np.testing.assert_allclose(q, ref, atol=1e-12)
    np.testing.assert_allclose(q @ np.swapaxes(q, -1, -2), np.broadcast_to(np.eye(b), q.shape), atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_cayley_computes_in_float32_for_low_precision_inputs(dtype):
    rng = np.random.default_rng(1)
    packed = jnp.asarray(rng.normal(size=(6, 28)), dtype)
    q = boft.cayley(packed, 8)
    assert q.dtype == jnp.float32
    ref = np_cayley(np_skew(np.asarray(packed, np.float64), 8))
    np.testing.assert_allclose(np.asarray(q), ref, atol=1e-5)
    assert np.abs(np.asarray(q) @ np.swapaxes(np.asarray(q), -1, -2) - np.eye(8)).max() < 1e-5


def test_neumann_converges_to_exact_in_the_same_direction():
    rng = np.random.default_rng(2)
    b = 8
    packed = rng.normal(size=(10, b * (b - 1) // 2))
    s = np_skew(packed, b)
    s *= 0.5 / np.linalg.norm(s, ord=2, axis=(-2, -1), keepdims=True)  # ||S||_2 = 0.5 < 1
    rows, cols = np.triu_indices(b, 1)
    packed = s[..., rows, cols]
    exact = np_cayley(s)
    errors, errors_t = [], []
    with jax.enable_x64(True):
        for n in range(1, 13):
            q = np.asarray(boft.cayley(jnp.asarray(packed), b, "neumann", neumann_terms=n))
            errors.append(np.abs(q - exact).max())
            errors_t.append(np.abs(q - np.swapaxes(exact, -1, -2)).max())
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 and errors[0] > 0.1
    # same direction: closer to the exact Q than to its transpose (the reference OFT's mistake)
    assert all(e < et for e, et in zip(errors[1:], errors_t[1:]))
    # the truncation error is exactly (I - S)(-S)^n (I + S)^-1 in norm ~ ||S||^n
    assert errors[9] < 4 * 0.5**10


def test_cayley_identity_at_zero_and_gradients():
    np.testing.assert_array_equal(boft.cayley(jnp.zeros((2, 3, 6)), 4), np.broadcast_to(np.eye(4), (2, 3, 4, 4)))
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        p = jnp.asarray(0.5 * rng.normal(size=(3, 10)))
        check_grads(jax.jit(lambda p: boft.cayley(p, 5)), (p,), order=2, modes=("fwd", "rev"))
        check_grads(jax.jit(lambda p: boft.cayley(p, 5, "neumann", neumann_terms=3)), (p,), order=2, modes=("rev",))
        # above b = 16 the tangent map uses batched matmuls and the gather unpack instead
        p = jnp.asarray(0.2 * rng.normal(size=(2, 153)))
        check_grads(jax.jit(lambda p: boft.cayley(p, 18)), (p,), order=1, modes=("fwd", "rev"))


def test_cayley_second_derivatives_match_autodiff_of_a_float64_solve():
    """Second derivatives through the custom tangent map (custom_linear_solve) vs plain autodiff:
    the full Hessian (reverse over forward) at b = 4, Hessian-vector products (forward over
    reverse) at b = 17, where the tangent map takes its batched-matmul branch."""
    rng = np.random.default_rng(8)
    with jax.enable_x64(True):
        for b in (4, 17):
            p = jnp.asarray(0.4 * rng.normal(size=(2, b * (b - 1) // 2)))
            w = jnp.asarray(rng.normal(size=(b, b)))

            def ref(p):
                s = boft.unpack_skew(p)
                eye = jnp.eye(b)
                return jnp.linalg.solve(eye + s, jnp.broadcast_to(eye, s.shape) - s)

            f = lambda c: lambda p: jnp.sum(jnp.sin(c(p) * w))  # noqa: E731
            if b == 4:
                hess = lambda c: jax.jit(jax.hessian(f(c)))(p)  # noqa: E731
                np.testing.assert_allclose(hess(boft.cayley), hess(ref), rtol=1e-8, atol=1e-10)
                continue
            for _ in range(2):
                v = jnp.asarray(rng.normal(size=p.shape))
                hvp = lambda c: jax.jit(lambda p, v: jax.jvp(jax.grad(f(c)), (p,), (v,))[1])(p, v)  # noqa: E731
                np.testing.assert_allclose(hvp(boft.cayley), hvp(ref), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("q", [1, 3, 8, 16, 17, 24])
def test_small_matmul_matches_numpy(q):
    """Both forms (multiply-adds up to 16, batched matmul above), with broadcasting leading axes."""
    from boft_jax.orthogonal import _unpack_linear, small_matmul

    rng = np.random.default_rng(q)
    a, c = rng.normal(size=(3, 1, 5, q)), rng.normal(size=(4, q, 2))
    with jax.enable_x64(True):
        np.testing.assert_allclose(small_matmul(jnp.asarray(a), jnp.asarray(c)), a @ c, rtol=1e-13, atol=1e-13)
        packed = jnp.asarray(rng.normal(size=(3, q * (q - 1) // 2)))
        np.testing.assert_array_equal(_unpack_linear(packed, q), np_skew(np.asarray(packed), q))


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**31 - 1), st.floats(0.01, 3.0))
def test_property_cayley_orthogonal_det_one(b, seed, scale):
    rng = np.random.default_rng(seed)
    packed = scale * rng.normal(size=(4, b * (b - 1) // 2))
    with jax.enable_x64(True):
        q = np.asarray(boft.cayley(jnp.asarray(packed), b))
    np.testing.assert_allclose(q @ np.swapaxes(q, -1, -2), np.broadcast_to(np.eye(b), q.shape), atol=1e-10)
    np.testing.assert_allclose(np.linalg.det(q), 1.0, atol=1e-9)  # Cayley images are rotations
    np.testing.assert_allclose(q, np_cayley(np_skew(packed, b)), atol=1e-10)


@pytest.mark.parametrize("b", [1, 3, 8, 70])
def test_solve_identity_plus_skew_matches_numpy_float64(b):
    rng = np.random.default_rng(20 + b)
    a = rng.normal(size=(3, 1, b, b))
    s = a - np.swapaxes(a, -1, -2)
    rhs = rng.normal(size=(4, b, b))  # broadcasts against s's batch (3, 1)
    with jax.enable_x64(True):
        x = np.asarray(boft.solve_identity_plus_skew(jnp.asarray(s), jnp.asarray(rhs)))
    ref = np.linalg.solve(np.eye(b) + s, np.broadcast_to(rhs, (3, 4, b, b)))
    assert x.shape == (3, 4, b, b)
    np.testing.assert_allclose(x, ref, atol=1e-11)
    with pytest.raises(ValueError, match="solve_identity_plus_skew needs"):
        boft.solve_identity_plus_skew(jnp.zeros((3, 4)), jnp.zeros((4, 4)))


@pytest.mark.parametrize("b", [2, 3, 7, 8, 12, 32])
@pytest.mark.parametrize("scale", [0.05, 1.0, 10.0])
def test_cayley_float32_is_as_accurate_as_lapack(b, scale):
    """float32 Cayley blocks vs the float64 formula: about as accurate as a pivoted LAPACK solve.

    Per block, the largest entry error stays within ``eps32 (1 + ||S||_2)`` (measured: at most
    ~0.5x that; without the refinement step 10 of these 18 cases exceed it).  LAPACK's own error
    depends on the CPU's BLAS kernels (up to 2x between kernel sets on the same data), so the
    comparison with it has a loose margin."""
    rng = np.random.default_rng(b)
    packed = scale * rng.normal(size=(40, b * (b - 1) // 2))
    skew = np_skew(packed, b)
    ref = np_cayley(skew)
    q = np.asarray(boft.cayley(jnp.asarray(packed, jnp.float32), b), np.float64)
    block_err = np.abs(q - ref).max(axis=(-2, -1))
    bound = np.finfo(np.float32).eps * (1.0 + np.linalg.norm(skew, ord=2, axis=(-2, -1)))
    assert np.all(block_err <= bound), (block_err / bound).max()
    s32 = jnp.asarray(skew, jnp.float32)
    eye = jnp.eye(b, dtype=jnp.float32)
    lapack = np.asarray(jnp.linalg.solve(eye + s32, jnp.broadcast_to(eye, s32.shape) - s32), np.float64)
    err, err_lapack = block_err.max(), np.abs(lapack - ref).max()
    assert err <= 3.0 * err_lapack + 1e-7, (err, err_lapack)
    assert np.abs(q @ np.swapaxes(q, -1, -2) - np.eye(b)).max() < 1e-5


def test_cayley_float32_pivot_row_survives_huge_pivots():
    """Pivots of I + S grow like 1 + |S|^2: the pivot row must be selected, not computed as
    row - (pivot - 1) row, which is zero once pivot - 1 rounds to the pivot (a 2 x 2 block at
    entries ~1e4 rotated the wrong way in float32, at ~1e5 was not orthogonal; the closed form
    checks it exactly).  Larger blocks at such entries: see solve_identity_plus_skew."""
    rng = np.random.default_rng()
    for a in (1e3, 1e4, 1e5) * rng.uniform(0.5, 2.0, 3):
        q = np.asarray(boft.cayley(jnp.asarray([a], jnp.float32), 2), np.float64)
        a = float(np.float32(a))
        want = np.array([[1 - a * a, -2 * a], [2 * a, 1 - a * a]]) / (1 + a * a)
        np.testing.assert_allclose(q, want, rtol=0, atol=3e-7)


def test_cayley_gradient_equals_autodiff_of_a_lapack_solve():
    """The closed-form derivative dQ = -1/2 (Q + I) dS (Q + I) vs JAX's autodiff of jnp.linalg.solve."""
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        for scale in (0.01, 0.5, 5.0):
            p = jnp.asarray(scale * rng.normal(size=(2, 6, 28)))
            w = jnp.asarray(rng.normal(size=(8, 8)))

            def ref(p):
                s = boft.unpack_skew(p)
                eye = jnp.eye(8)
                return jnp.linalg.solve(eye + s, jnp.broadcast_to(eye, s.shape) - s)

            np.testing.assert_allclose(boft.cayley(p), ref(p), atol=1e-13)
            g = jax.grad(lambda p: jnp.sum(jnp.tanh(boft.cayley(p) * w)))(p)
            g_ref = jax.grad(lambda p: jnp.sum(jnp.tanh(ref(p) * w)))(p)
            np.testing.assert_allclose(g, g_ref, rtol=1e-9, atol=1e-12)


def test_cayley_compiles_to_no_library_calls():
    """No LAPACK custom calls (they deadlocked XLA:CPU in many-layer programs): fused loops only."""
    p = jnp.asarray(np.random.default_rng(5).normal(size=(2, 12, 28)), jnp.float32)
    for fn in (lambda p: boft.cayley(p), jax.grad(lambda p: jnp.sum(boft.cayley(p) ** 3))):
        hlo = jax.jit(fn).lower(p).compile().as_text()
        assert "custom-call" not in hlo and "custom_call_target" not in hlo


@pytest.mark.parametrize("b", [1, 3, 8, 16])
def test_elimination_loop_and_unrolled_forms_agree_with_float64_inverse(b):
    """Both forms of the elimination (a fori_loop on CPU/TPU, unrolled on CUDA/ROCm) invert I + S.

    The unrolled form is not what CPU programs run, so it is checked here directly (float32 and
    float64, against numpy's inverse), with its gradient against the loop's."""
    from boft_jax import orthogonal

    rng = np.random.default_rng()  # fresh draws every run: pivots stay >= 1 for any skew S
    a = rng.normal(size=(4, 3, b, b))
    s = 0.7 * (a - np.swapaxes(a, -1, -2))
    ref = np.linalg.inv(np.eye(b) + s)
    for form in (orthogonal._invert_loop, orthogonal._invert_unrolled):
        np.testing.assert_allclose(np.asarray(jax.jit(form)(jnp.asarray(s, jnp.float32))), ref, atol=2e-5)
        with jax.enable_x64(True):
            np.testing.assert_allclose(np.asarray(jax.jit(form)(jnp.asarray(s))), ref, atol=1e-12)
    w = jnp.asarray(rng.normal(size=(b, b)), jnp.float32)
    grads = [jax.grad(lambda s, f=f: jnp.sum(jnp.sin(f(s) * w)))(jnp.asarray(s, jnp.float32))
             for f in (orthogonal._invert_loop, orthogonal._invert_unrolled)]
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_cayley_lowers_to_a_loop_on_cpu_and_unrolled_steps_on_cuda():
    """The platform choice of the elimination, seen in the lowered programs (jax.export lowers for
    a platform without its device): one while loop per call site for CPU/TPU, none for CUDA/ROCm;
    the gradient too (the derivative rule runs no elimination of its own)."""
    def loops(fn, p, platforms):
        return {platform: lowered_for(fn, (p,), platform).count("stablehlo.while") for platform in platforms}

    p = jnp.asarray(np.random.default_rng(6).normal(size=(2, 12, 28)), jnp.float32)
    for fn in (boft.cayley, jax.grad(lambda p: jnp.sum(boft.cayley(p) ** 3))):
        assert loops(fn, p, ("cpu", "tpu", "cuda", "rocm")) == {"cpu": 1, "tpu": 1, "cuda": 0, "rocm": 0}
    # Large blocks (b = d_in for OFT with one block) keep the loop everywhere: bounded compile time.
    big = jnp.asarray(0.1 * np.random.default_rng(7).normal(size=(1, 65 * 64 // 2)), jnp.float32)
    assert loops(boft.cayley, big, ("cpu", "cuda")) == {"cpu": 1, "cuda": 1}


@pytest.mark.parametrize("method", ["exact", "neumann"])
def test_cayley_products_run_at_highest_precision_on_gpu(method):
    """Every matrix product of the Cayley map (and of its gradient) asks for HIGHEST precision: on a
    GPU, XLA's default for float32 products is TF32 (10 mantissa bits), which would make the
    rotations orthogonal to ~1e-3 only.  Checked on the program lowered for CUDA (no GPU needed)."""
    b = 20  # above small_matmul's broadcast limit, so products are dot_generals
    packed = jnp.asarray(np.random.default_rng(7).normal(size=(3, 4, b * (b - 1) // 2)), jnp.float32)

    def f(p):
        return boft.cayley(p, b, method, neumann_terms=4)

    for fn in (f, jax.grad(lambda p: jnp.sum(jnp.sin(f(p))))):
        text = lowered_for(fn, (packed,), "cuda")
        dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
        assert dots, "expected matrix products in the lowered program"
        loose = [line.strip()[:160] for line in dots if "precision = [HIGHEST, HIGHEST]" not in line]
        assert not loose, f"{len(loose)} of {len(dots)} products at default precision: {loose}"


def test_exact_cayley_gradient_stays_accurate_for_large_skews():
    """The derivative uses P = 2 (I + S)^(-1) from the refined inverse, not Q + I (which cancels when
    Q is near -I): median relative error over 400 fresh draws against the float64 closed form
    dQ = -2 A^(-1) dS A^(-1).  (Q + I: medians about 6e-6 at entries ~30 and 6e-5 at ~100; this
    way about 1.2e-6 and 1.2e-5.)"""
    b, n = 3, 400
    iu = np.triu_indices(b, 1)
    grad = jax.jit(jax.grad(lambda p, w: jnp.sum(boft.cayley(p, block_size=b) * w)))  # one draw per row
    rng = np.random.default_rng()
    for scale, bound in ((30.0, 3e-6), (100.0, 3e-5)):
        p = (rng.standard_normal((n, 3)) * scale).astype(np.float32)
        w = rng.standard_normal((n, b, b)).astype(np.float32)
        got = np.asarray(grad(jnp.asarray(p), jnp.asarray(w)), np.float64)
        s = np.zeros((n, b, b))
        s[:, iu[0], iu[1]] = p
        s = s - np.swapaxes(s, 1, 2)
        ai = np.linalg.inv(np.eye(b) + s)
        want = np.empty((n, 3))
        for k in range(3):
            e = np.zeros((b, b))
            e[iu[0][k], iu[1][k]] = 1.0
            want[:, k] = np.sum(w * (-2.0 * ai @ (e - e.T) @ ai), axis=(1, 2))
        errs = np.abs(got - want).max(1) / np.abs(want).max(1)
        assert np.median(errs) < bound, (scale, np.median(errs))
