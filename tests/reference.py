"""Independent float64 references used across the tests: dense matrices, the published formulas."""

from __future__ import annotations

import numpy as np


def reference_perm(d: int, b: int, m: int, i: int) -> np.ndarray:
    """PEFT's rule written from its description: for factor i >= 1 (and m > 1), cut the d features
    into chunks of b * 2**i; cut each chunk into half-blocks of b / 2; list the even-numbered
    half-blocks first, then the odd-numbered ones.  Factor 0 (and m == 1) is the identity."""
    if m == 1 or i == 0:
        return np.arange(d)
    chunk, half = b * 2**i, b // 2
    n_groups = chunk // half
    order = [g for g in range(n_groups) if g % 2 == 0] + [g for g in range(n_groups) if g % 2 == 1]
    out = []
    for start in range(0, d, chunk):
        for g in order:
            out.extend(range(start + g * half, start + (g + 1) * half))
    return np.array(out)


def dense_rotation(blocks: np.ndarray) -> np.ndarray:
    """M = F_{m-1} ... F_0 with F_i = P_i blockdiag(Q_i) P_i^T, every matrix dense, float64."""
    m, k, b, _ = blocks.shape
    d = k * b
    M = np.eye(d)
    for i in range(m):
        P = np.zeros((d, d))
        P[np.arange(d), reference_perm(d, b, m, i)] = 1.0
        D = np.zeros((d, d))
        for j in range(k):
            D[j * b : (j + 1) * b, j * b : (j + 1) * b] = blocks[i, j]
        M = P @ D @ P.T @ M
    return M


def dense_layer(x, kernel, blocks, scale, bias=None):
    """BOFT Dense layer from the definition, in float64: y = ((x M) K) * s + bias."""
    M = dense_rotation(np.asarray(blocks, np.float64))
    y = (np.asarray(x, np.float64) @ M) @ np.asarray(kernel, np.float64) * np.asarray(scale, np.float64)
    return y if bias is None else y + np.asarray(bias, np.float64)


def np_skew_from_packed(packed, b):
    """The skew-symmetric ``(..., b, b)`` matrices (float64) whose strict upper triangles, row by row,
    are ``packed (..., b(b-1)/2)``."""
    packed = np.asarray(packed, np.float64)
    s = np.zeros(packed.shape[:-1] + (b, b))
    r, c = np.triu_indices(b, 1)
    s[..., r, c] = packed
    s[..., c, r] = -packed
    return s


def np_cayley_from_packed(packed, b):
    """Q = (I - S)(I + S)^-1 with an explicit inverse, from packed strict upper triangles."""
    s = np_skew_from_packed(packed, b)
    eye = np.eye(b)
    return (eye - s) @ np.linalg.inv(eye + s)


def all_eqns(jaxpr):
    """Every equation of a jaxpr, recursing into sub-jaxprs (jit, scan, custom_vjp, cond, ...)."""

    def subs(value):
        if hasattr(value, "eqns"):
            yield value
        elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
            yield value.jaxpr
        elif isinstance(value, (tuple, list)):
            for v in value:
                yield from subs(v)

    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in subs(v):
                yield from all_eqns(sub)


def lowered_for(fn, args, platform: str) -> str:
    """The StableHLO text of ``jax.jit(fn)(*args)`` lowered for ``platform`` ("cpu", "cuda", "tpu",
    "rocm") by ``jax.export``: what a program would run there, readable without that device."""
    import jax
    from jax import export

    return export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()


def np_neumann_from_packed(packed, b, n_terms):
    """Cayley-Neumann blocks Q = (I - S) sum_{j<n} (-S)^j from packed strict upper triangles, float64.

    Written from the formula with explicit matrix powers (not Horner's rule, unlike the library)."""
    s = np_skew_from_packed(packed, b)
    eye = np.broadcast_to(np.eye(b), s.shape)
    series = sum(np.linalg.matrix_power(-s, j) for j in range(n_terms))
    return (eye - s) @ series
