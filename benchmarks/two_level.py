"""Issue 3, a probe (not adopted): m = 4 as two 16-wide levels instead of one 64-wide span.

For ``m = 4``, ``b = 8`` the library applies ``M = F_3 F_2 F_1 F_0`` through its dense ``64 x 64``
diagonal blocks (``boft_jax._ops``): 2x the FLOPs of the four factors, in one product.  The issue
suggests grouping the factors.  ``M = A C`` with ``C = F_1 F_0`` (block diagonal in contiguous
chunks of ``2b = 16``) and ``A = F_3 F_2``, which is block diagonal too, in *strided* components of
``2b``: inside a chunk of ``8b`` features, feature ``p = ab 2b + gam h + delta`` (``h = b / 2``,
``ab`` in 0..3, ``gam`` in 0..3, ``delta`` in 0..h-1) is mixed by ``A`` only with the features of the
same ``gam``.  In those coordinates ``A``'s blocks are a two-factor butterfly of their own (``F_2`` as
its level 0, ``F_3`` as its level 1, blocks re-indexed), built by ``boft_jax.butterfly.span_blocks``
like ``C``'s.  Each product with ``M`` becomes two 16-wide ones: half the FLOPs of the 64-wide span,
in the broadcast multiply-add form that is fastest on XLA:CPU up to 16.

This script checks that ``(x A) C = x M``, ``M^T = C^T A^T`` and ``A (C K) = M K`` against the dense
float64 ``M`` (``boft.rotation_matrix``), then times, for one layer's shapes (``--tokens`` rows,
``d`` = 768 and 3072), each product the train step makes with ``M`` in both forms, interleaved:

  M K            the weight-side forward (``mode="weight"``)
  u M^T          the input's cotangent, both modes
  x M            the input-side forward (``mode="input"``; its input is a matmul form in the library)
  block grads    the 64-wide ``x_g^T u_g`` (what the span form reduces over tokens) against what the
                 two-level form would need: ``v = x A`` again, then the contiguous 16-wide ``v^T u`` for
                 ``C`` and the strided ``x^T (u C^T)`` for ``A``

and prints each product's median time per call (``--inner`` back-to-back calls per timing) in both
forms and their paired ratio (per round).

Usage::

  python benchmarks/two_level.py                 # 788 tokens (the CPU train step: 4 x 197)
  python benchmarks/two_level.py --repeats 31
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import boft_jax as boft  # noqa: E402
from boft_jax import _ops  # noqa: E402
from boft_jax.butterfly import span_blocks, span_cols  # noqa: E402
from boft_jax.orthogonal import small_matmul  # noqa: E402
from _util import Candidate, add_malloc_flag, interleaved_times, machine_description, markdown_table, medians, paired_ratio  # noqa: E402

_HI = jax.lax.Precision.HIGHEST


def two_level(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(A_blocks, C_blocks)`` for ``(4, k, b, b)`` factor blocks: ``C`` contiguous ``(k/2, 2b, 2b)``,
    ``A`` in strided components ``(g, gam)`` of an ``8b`` chunk, inner order ``(ab, delta)``."""
    m, k, b, _ = blocks.shape
    if m != 4:
        raise ValueError(f"two_level needs m = 4 factors, got {m}")
    g = k // 8
    # A's own level-0 blocks are F_2's and its level-1 blocks F_3's, re-indexed (g, alpha|beta, gam) -> (g, gam, .)
    q2 = blocks[2].reshape(g, 2, 4, b, b).transpose(0, 2, 1, 3, 4).reshape(k, b, b)
    q3 = blocks[3].reshape(g, 2, 4, b, b).transpose(0, 2, 1, 3, 4).reshape(k, b, b)
    return span_blocks(jnp.stack([q2, q3])), span_blocks(blocks[:2])


def strided_rows(x: jax.Array, a: jax.Array, transpose: bool) -> jax.Array:
    """``x A`` (or ``x A^T``) for ``x (T, d)``: ``4 h`` broadcast multiply-adds of strided slices."""
    t, d = x.shape
    c, w, _ = a.shape
    h = w // 4
    g = c // 4
    a6 = a.reshape(g, 4, 4, h, 4, h)  # g, gam, ab_in, d_in, ab_out, d_out
    if transpose:
        a6 = a6.transpose(0, 1, 4, 5, 2, 3)
    coeff = jnp.dot(jnp.eye(w, dtype=a.dtype), a6.transpose(2, 3, 0, 4, 1, 5).reshape(w, d), precision=_HI)
    x5 = x.reshape(t, g, 4, 4, h)
    out = None
    for ai in range(4):
        for di in range(h):
            col = x5[:, :, ai, :, di][:, :, None, :, None]
            term = jnp.broadcast_to(col, (t, g, 4, 4, h)).reshape(t, d) * coeff[ai * h + di]
            out = term if out is None else out + term
    return out


def strided_cols(w: jax.Array, a: jax.Array) -> jax.Array:
    """``A w`` for ``w (d, n)``."""
    d, n = w.shape
    c, width, _ = a.shape
    h, g = width // 4, c // 4
    wv = w.reshape(g, 4, 4, h, n).transpose(0, 2, 1, 3, 4).reshape(c, width, n)
    return small_matmul(a, wv).reshape(g, 4, 4, h, n).transpose(0, 2, 1, 3, 4).reshape(d, n)


def strided_block_grad(x: jax.Array, u: jax.Array, width: int) -> jax.Array:
    """``x_c^T u_c`` over the strided components (one batched matmul on transposed views)."""
    t, d = x.shape
    h = width // 4
    g = d // (4 * width)

    def view(v):
        return v.reshape(t, g, 4, 4, h).transpose(1, 3, 0, 2, 4).reshape(g * 4, t, width)

    return jnp.einsum("ctr,cte->cre", view(x), view(u), precision=_HI)


def check(d: int, b: int = 8, tokens: int = 24, seed: int = 0) -> float:
    """Largest error of the three two-level identities against the dense float64 ``M``."""
    rng = np.random.default_rng(seed)
    skew = jnp.asarray(0.3 * rng.standard_normal((4, d // b, boft.num_skew_params(b))), jnp.float32)
    blocks = boft.cayley(skew)
    a, c = two_level(blocks)
    dense = np.asarray(boft.rotation_matrix(blocks), np.float64)
    x = rng.standard_normal((tokens, d)).astype(np.float32)
    kern = rng.standard_normal((d, 2 * b)).astype(np.float32)
    errs = [
        np.abs(np.asarray(_ops._rows(strided_rows(jnp.asarray(x), a, False), c, False)) - x @ dense).max(),
        np.abs(np.asarray(strided_rows(_ops._rows(jnp.asarray(x), c, True), a, True)) - x @ dense.T).max(),
        np.abs(np.asarray(strided_cols(span_cols(jnp.asarray(kern), c), a)) - dense @ kern).max(),
    ]
    return float(max(errs))


def candidates(d: int, tokens: int, rng: np.random.Generator) -> list[tuple[str, Candidate, Candidate]]:
    b = 8
    skew = jnp.asarray(0.1 * rng.standard_normal((4, d // b, boft.num_skew_params(b))), jnp.float32)
    blocks = boft.cayley(skew)
    span = span_blocks(blocks)
    a, c = two_level(blocks)
    x = jnp.asarray(rng.standard_normal((tokens, d)), jnp.float32)
    u = jnp.asarray(rng.standard_normal((tokens, d)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((d, 768)), jnp.float32)

    def two_block_grads(x, u, a, c):
        v = strided_rows(x, a, False)
        return _ops._block_grad(v, u, c.shape[-1]), strided_block_grad(x, _ops._rows(u, c, True), a.shape[-1])

    pairs = [
        ("M K", (jax.jit(span_cols), (kern, span)), (jax.jit(lambda k, a, c: strided_cols(span_cols(k, c), a)), (kern, a, c))),
        ("u M^T", (jax.jit(lambda u, s: _ops._rows(u, s, True)), (u, span)),
         (jax.jit(lambda u, a, c: strided_rows(_ops._rows(u, c, True), a, True)), (u, a, c))),
        ("x M", (jax.jit(lambda x, s: _ops._rows(x, s, False, elementwise=False)), (x, span)),
         (jax.jit(lambda x, a, c: _ops._rows(strided_rows(x, a, False), c, False, elementwise=False)), (x, a, c))),
        ("block grads", (jax.jit(lambda x, u: _ops._block_grad(x, u, 64)), (x, u)),
         (jax.jit(two_block_grads), (x, u, a, c))),
    ]
    return [(f"{name}, d = {d}", Candidate(f"{name} span {d}", *s), Candidate(f"{name} two {d}", *t)) for name, s, t in pairs]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=788, help="token rows per layer call (default 788 = 4 x 197)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--inner", type=int, default=10,
                   help="back-to-back calls per timing, one wait at the end (default 10): a single call's"
                        " dispatch and wake-up costs about as much as these products")
    add_malloc_flag(p)
    args = p.parse_args(argv)
    allocator = "host allocator: " + boft.host_memory.configure(args.system_malloc)
    print(f"{machine_description()}; {allocator}")
    for d in (768, 3072):
        print(f"two-level identities, d = {d}: max error against float64 dense M {check(d):.2e}")
    rng = np.random.default_rng(0)
    rows = [c for d in (768, 3072) for c in candidates(d, args.tokens, rng)]
    runs = interleaved_times([c for _, s, t in rows for c in (s, t)], repeats=args.repeats, inner=args.inner)
    times = medians(runs)
    table = []
    for label, s, t in rows:
        ratio, lo, hi = paired_ratio(runs[t.name], runs[s.name])
        table.append([label, f"{1e3 * times[s.name]:.3f}", f"{1e3 * times[t.name]:.3f}", f"{ratio:.2f}x [{lo:.2f}, {hi:.2f}]"])
    print(markdown_table(["product (one layer)", "64-wide span, ms", "two 16-wide levels, ms", "two / span, paired [90% CI]"], table))


if __name__ == "__main__":
    main()
