"""Butterfly permutations and the structured rotation, against independent dense references."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import boft_jax as boft
from boft_jax.butterfly import use_span
from reference import all_eqns, dense_rotation, reference_perm


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------
def valid_triples(max_d=1024, block_sizes=(2, 4, 8, 16, 32), max_m=8):
    for b in block_sizes:
        for d in range(b, max_d + 1, b):
            for m in range(1, max_m + 1):
                if boft.structure_error(d, b, m) is None:
                    yield d, b, m


def random_blocks(rng, m, k, b, orthogonal=False):
    if orthogonal:
        q, _ = np.linalg.qr(rng.normal(size=(m, k, b, b)))
        return q
    return rng.normal(size=(m, k, b, b))


# ---------------------------------------------------------------------------------------------
# Permutations
# ---------------------------------------------------------------------------------------------
def test_permutations_equal_reference_rule_for_every_valid_config():
    count = 0
    for d, b, m in valid_triples():
        perms = boft.butterfly_permutations(d, b, m)
        assert perms.shape == (m, d)
        for i in range(m):
            np.testing.assert_array_equal(perms[i], reference_perm(d, b, m, i), err_msg=f"{(d, b, m, i)}")
        count += 1
    assert count > 1500  # the sweep really covered the grid (1975 valid triples)


def test_permutations_are_permutations_and_factor0_is_identity():
    perms = boft.butterfly_permutations(96, 4, 4)
    np.testing.assert_array_equal(perms[0], np.arange(96))
    for p in perms:
        np.testing.assert_array_equal(np.sort(p), np.arange(96))
    assert not np.array_equal(perms[1], np.arange(96))


@pytest.mark.parametrize(
    "d,b,m,fragment",
    [
        (30, 4, 1, "block_size 4 does not divide d = 30"),
        (24, 3, 2, "even block_size"),
        (12, 4, 2, "even number of blocks"),
        (24, 4, 3, "divisible by block_size * 2**(n_factors-1) = 16"),
        (24, 0, 1, "positive integer"),
    ],
)
def test_invalid_structures_raise_with_valid_alternatives(d, b, m, fragment):
    with pytest.raises(ValueError) as e:
        boft.butterfly_permutations(d, b, m)
    msg = str(e.value)
    assert fragment in msg
    assert "Valid block sizes" in msg
    # every alternative it names really is valid
    listed = msg.split(f"n_factors = {m}: ")[1].split(";")[0]
    for tok in listed.replace("...", "").split(","):
        tok = tok.strip().split(" ")[0]
        if tok.isdigit():
            assert boft.structure_error(d, int(tok), m) is None


def test_max_factors_and_valid_block_sizes():
    assert boft.max_factors(64, 4) == 5  # 16 blocks -> 1 + log2(16)
    assert boft.max_factors(96, 4) == 4  # 24 = 8 * 3 blocks
    assert boft.max_factors(30, 3) == 1  # odd b: OFT only
    assert boft.max_factors(30, 4) == 0
    assert boft.valid_block_sizes(24, 3) == [2, 6]
    for d in (24, 48, 100):
        for m in (1, 2, 3):
            for b in boft.valid_block_sizes(d, m):
                assert boft.max_factors(d, b) >= m


# ---------------------------------------------------------------------------------------------
# rotate == x @ rotation_matrix == dense product
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("b", [2, 4, 6])
def test_rotate_equals_dense_product_float64(m, b):
    rng = np.random.default_rng(1000 * m + b)
    d = b * 2 ** (m - 1) * int(rng.integers(1, 4))
    blocks = random_blocks(rng, m, d // b, b)  # arbitrary (non-orthogonal) blocks: rotate is linear in them
    lead = tuple(int(s) for s in rng.integers(1, 4, size=int(rng.integers(0, 3))))
    x = rng.normal(size=lead + (d,))
    with jax.enable_x64(True):
        ref = x @ dense_rotation(blocks)
        y = np.asarray(boft.rotate(jnp.asarray(x), jnp.asarray(blocks)))
        M = np.asarray(boft.rotation_matrix(jnp.asarray(blocks)))
        assert y.dtype == np.float64
    np.testing.assert_allclose(M, dense_rotation(blocks), rtol=0, atol=1e-12)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(x @ M, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("m,d,b", [(1, 24, 8), (2, 32, 4), (3, 48, 4), (4, 64, 2)])
def test_rotate_kernel_equals_dense_left_product(m, d, b):
    rng = np.random.default_rng(7 + m)
    blocks = random_blocks(rng, m, d // b, b)
    kernel = rng.normal(size=(d, 3, 5))  # DenseGeneral-like trailing axes
    with jax.enable_x64(True):
        got = np.asarray(boft.rotate_kernel(jnp.asarray(kernel), jnp.asarray(blocks)))
    ref = np.einsum("ij,jab->iab", dense_rotation(blocks), kernel)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)


def test_input_and_weight_side_agree():
    rng = np.random.default_rng(3)
    m, d, b = 3, 64, 8
    blocks = jnp.asarray(random_blocks(rng, m, d // b, b, orthogonal=True), jnp.float32)
    x = jnp.asarray(rng.normal(size=(5, d)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(d, 12)), jnp.float32)
    np.testing.assert_allclose(
        boft.rotate(x, blocks) @ kernel, x @ boft.rotate_kernel(kernel, blocks), rtol=1e-5, atol=1e-5
    )


def test_flat_blocks_with_n_factors_accepted_and_checked():
    rng = np.random.default_rng(4)
    blocks = jnp.asarray(random_blocks(rng, 2, 8, 4))
    x = jnp.asarray(rng.normal(size=(2, 32)))
    np.testing.assert_allclose(boft.rotate(x, blocks.reshape(16, 4, 4), 2), boft.rotate(x, blocks), atol=1e-6)
    with pytest.raises(ValueError, match="n_factors = 3"):
        boft.rotate(x, blocks, 3)
    with pytest.raises(ValueError, match="features"):
        boft.rotate(x[:, :16], blocks)


# ---------------------------------------------------------------------------------------------
# Structure of M
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.float64, 1e-12)])
def test_rotation_is_orthogonal(dtype, tol):
    m, d, b = 4, 256, 8
    with jax.enable_x64(dtype == jnp.float64):
        params = 0.5 * jax.random.normal(jax.random.key(0), (m, d // b, boft.num_skew_params(b)), dtype)
        blocks = boft.cayley(params, b)
        assert blocks.dtype == dtype
        M = np.asarray(boft.rotation_matrix(blocks)).astype(np.float64)
    err = np.abs(M.T @ M - np.eye(d)).max()
    assert err < tol, err
    assert np.abs(M - np.eye(d)).max() > 0.1  # a real rotation, not the identity


def test_identity_at_zero_params():
    blocks = boft.cayley(jnp.zeros((3, 8, 6)), 4)
    np.testing.assert_array_equal(boft.rotation_matrix(blocks), np.eye(32))
    x = jax.random.normal(jax.random.key(1), (4, 32))
    np.testing.assert_array_equal(boft.rotate(x, blocks), x)


def test_single_factor_is_block_diagonal_oft():
    rng = np.random.default_rng(5)
    blocks = random_blocks(rng, 1, 6, 4, orthogonal=True)
    with jax.enable_x64(True):
        M = np.asarray(boft.rotation_matrix(jnp.asarray(blocks)))
    ref = np.zeros((24, 24))
    for j in range(6):
        ref[4 * j : 4 * j + 4, 4 * j : 4 * j + 4] = blocks[0, j]
    np.testing.assert_allclose(M, ref, atol=1e-14)


@pytest.mark.parametrize("d,b", [(32, 2), (64, 8), (128, 4)])
def test_rotation_is_dense_exactly_at_full_depth(d, b):
    rng = np.random.default_rng(d + b)
    full = 1 + int(np.log2(d // b))
    assert boft.max_factors(d, b) == full
    for m in range(1, full + 1):
        blocks = random_blocks(rng, m, d // b, b, orthogonal=True)
        with jax.enable_x64(True):
            M = np.asarray(boft.rotation_matrix(jnp.asarray(blocks)))
        nonzero = (np.abs(M) > 1e-12).sum()
        # each factor doubles the number of inputs every output depends on
        assert nonzero == d * min(d, b * 2 ** (m - 1)), (m, nonzero)
    assert nonzero == d * d  # fully dense at m = 1 + log2(d / b)


# ---------------------------------------------------------------------------------------------
# Transformations: jit, vmap, grad
# ---------------------------------------------------------------------------------------------
class RotateTransformsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((1, 16, 4), (3, 64, 4))
    def test_jit_and_no_jit_agree_with_dense(self, m, d, b):
        rng = np.random.default_rng(m * d)
        params = jnp.asarray(0.3 * rng.normal(size=(m, d // b, boft.num_skew_params(b))), jnp.float32)
        x = jnp.asarray(rng.normal(size=(2, 3, d)), jnp.float32)

        @self.variant
        def f(x, params):
            return boft.rotate(x, boft.cayley(params, b))

        expected = x @ dense_rotation(np.asarray(boft.cayley(params, b), np.float64))
        chex.assert_trees_all_close(f(x, params), expected.astype(np.float32), atol=2e-5)


def test_vmap_over_a_batch_of_block_sets():
    rng = np.random.default_rng(11)
    n, m, d, b = 5, 2, 32, 4
    blocks = jnp.asarray(random_blocks(rng, n * m, d // b, b).reshape(n, m, d // b, b, b), jnp.float32)
    x = jnp.asarray(rng.normal(size=(n, 7, d)), jnp.float32)
    got = jax.vmap(boft.rotate)(x, blocks)
    for j in range(n):
        ref = np.asarray(x[j], np.float64) @ dense_rotation(np.asarray(blocks[j], np.float64))
        np.testing.assert_allclose(got[j], ref, rtol=1e-4, atol=1e-4)
    kernels = jnp.asarray(rng.normal(size=(n, d, 6)), jnp.float32)
    got_k = jax.vmap(boft.rotate_kernel)(kernels, blocks)
    for j in range(n):
        ref = dense_rotation(np.asarray(blocks[j], np.float64)) @ np.asarray(kernels[j], np.float64)
        np.testing.assert_allclose(got_k[j], ref, rtol=1e-4, atol=1e-4)


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(12)
    m, d, b = 3, 32, 4
    with jax.enable_x64(True):
        params = jnp.asarray(0.3 * rng.normal(size=(m, d // b, boft.num_skew_params(b))))
        x = jnp.asarray(rng.normal(size=(3, d)))
        kernel = jnp.asarray(rng.normal(size=(d, 5)))
        check_grads(jax.jit(lambda x, p: boft.rotate(x, boft.cayley(p, b))), (x, params), order=2, modes=("rev",))
        check_grads(
            jax.jit(lambda k, p: boft.rotate_kernel(k, boft.cayley(p, b, "neumann", neumann_terms=4))),
            (kernel, params),
            order=1,
            modes=("fwd", "rev"),
        )


# ---------------------------------------------------------------------------------------------
# Compute rule: no d x d intermediates, no gathers
# ---------------------------------------------------------------------------------------------
def _jaxpr_shapes_and_prims(closed):
    shapes, prims = [], []
    for eqn in all_eqns(closed.jaxpr):
        prims.append(eqn.primitive.name)
        for v in eqn.outvars:
            shapes.append(tuple(getattr(v.aval, "shape", ())))
    return shapes, prims


def _assert_no_d_by_d_and_no_gather(closed, d, other):
    """No intermediate has two axes >= d (an axis equal to ``other``, the token / kernel-column count,
    chosen > d, does not count as a d axis), no gathers or scatters, and real matmuls."""
    shapes, prims = _jaxpr_shapes_and_prims(closed)
    assert shapes, "no equations traced"
    for s in shapes:
        big = [a for a in s if a >= d and a != other]
        assert len(big) < 2, f"intermediate of shape {s} has two axes >= d = {d}"
        assert s[-2:] != (d, d)
    assert not {"gather", "scatter", "scatter-add"} & set(prims)
    assert "dot_general" in prims
    return prims


def _f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_d_by_d_check_detects_a_dense_rotation():
    """The checker below can fail: the dense (d, d) matrix of rotation_matrix is caught."""
    d, b, m = 1024, 8, 6
    with pytest.raises(AssertionError, match="two axes >= d"):
        _assert_no_d_by_d_and_no_gather(jax.make_jaxpr(boft.rotation_matrix)(_f32(m, d // b, b, b)), d, 2048)


# m = 1 and 4 apply M through its dense (S x S) diagonal blocks; m = 5..8 (2^(m-1) > 2m) factor by
# factor; m = 8 is full depth at d = 1024, b = 8 (S = d: M itself is dense).
D_BY_D_CASES = [1, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("m", D_BY_D_CASES)
def test_rotate_builds_no_d_by_d_intermediate_and_no_gather(m):
    d, b, tokens = 1024, 8, 2048  # more tokens than d, so a token axis does not count as a second d axis
    assert use_span(d, b, m) == (m <= 4)  # the cases really cover both code paths
    assert boft.max_factors(d, b) == 8
    blocks = _f32(m, d // b, b, b)  # tracing only: values play no part in the program's shapes
    prims = _assert_no_d_by_d_and_no_gather(jax.make_jaxpr(boft.rotate)(_f32(tokens, d), blocks), d, tokens)
    if m > 4:  # factored: one batched matmul per factor
        assert prims.count("dot_general") == m


@pytest.mark.parametrize("m", D_BY_D_CASES)
def test_rotate_kernel_builds_no_d_by_d_intermediate_and_no_gather(m):
    d, b, cols = 1024, 8, 2048  # a wide kernel (d, 2048): its column axis does not count as a d axis
    prims = _assert_no_d_by_d_and_no_gather(
        jax.make_jaxpr(boft.rotate_kernel)(_f32(d, cols), _f32(m, d // b, b, b)), d, cols
    )
    if m > 4:
        assert prims.count("dot_general") == m


@pytest.mark.parametrize("m", D_BY_D_CASES)
def test_rotate_and_rotate_kernel_gradients_build_no_d_by_d_intermediate(m):
    d, b, n = 1024, 8, 2048
    blocks = _f32(m, d // b, b, b)

    def loss_rows(x, blocks):
        return jnp.sum(jnp.sin(boft.rotate(x, blocks)))

    def loss_kernel(kernel, blocks):
        return jnp.sum(jnp.sin(boft.rotate_kernel(kernel, blocks)))

    for loss in (loss_rows, loss_kernel):
        first = _f32(n, d) if loss is loss_rows else _f32(d, n)
        closed = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(first, blocks)
        prims = _assert_no_d_by_d_and_no_gather(closed, d, n)
        if m > 4:  # forward, input cotangent and block cotangent: one batched matmul each per factor
            assert prims.count("dot_general") == 3 * m, (loss.__name__, prims.count("dot_general"))
        # and the gradients' shapes are the inputs' shapes (nothing dense came back either)
        out_shapes = [tuple(v.aval.shape) for v in closed.jaxpr.outvars]
        assert out_shapes == [first.shape, blocks.shape]


# ---------------------------------------------------------------------------------------------
# Property-based
# ---------------------------------------------------------------------------------------------
@st.composite
def structures(draw):
    m = draw(st.integers(1, 4))
    b = draw(st.sampled_from([2, 4, 6, 8]) if m > 1 else st.integers(1, 7))
    mult = draw(st.integers(1, 3))
    k = (2 ** (m - 1)) * mult if m > 1 else draw(st.integers(1, 6))
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    return m, k, b, lead


@settings(max_examples=15, deadline=None)
@given(structures(), st.integers(0, 2**31 - 1))
def test_property_rotate_matches_dense_and_preserves_norms(structure, seed):
    m, k, b, lead = structure
    d = k * b
    assert boft.structure_error(d, b, m) is None
    rng = np.random.default_rng(seed)
    params = rng.normal(size=(m, k, boft.num_skew_params(b)))
    x = rng.normal(size=lead + (d,))
    with jax.enable_x64(True):
        blocks = boft.cayley(jnp.asarray(params), b)
        y = np.asarray(boft.rotate(jnp.asarray(x), blocks))
        ref = x @ dense_rotation(np.asarray(blocks))
    np.testing.assert_allclose(y, ref, atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-10)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 40), st.integers(1, 6))
def test_property_structure_error_agrees_with_definition(d, b, m):
    ok = d % b == 0 and (m == 1 or (b % 2 == 0 and (d // b) % 2 == 0 and d % (b * 2 ** (m - 1)) == 0))
    assert (boft.structure_error(d, b, m) is None) == ok
    if ok:
        assert boft.butterfly_permutations(d, b, m).shape == (m, d)
        assert boft.max_factors(d, b) >= m
    else:
        with pytest.raises(ValueError):
            boft.butterfly_permutations(d, b, m)


def test_num_layer_params_formula():
    for d_in, d_out, b, m in itertools.product([64, 96], [10, 64], [2, 4, 8], [1, 2, 3]):
        if boft.structure_error(d_in, b, m):
            continue
        expected = m * d_in * (b - 1) // 2 + d_out
        assert boft.num_layer_params(d_in, d_out, block_size=b, n_factors=m) == expected
        assert boft.num_layer_params(d_in, d_out, block_size=b, n_factors=m, bias=True) == expected + d_out
