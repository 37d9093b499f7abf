"""Issue 2: the structured rotation ``x -> x M`` vs a dense matmul vs PEFT's dense construction.

For every (d, m, b) of the grid, with ``tokens`` rows of activations, all measured in one run:

  rotate        ``boft.rotate(x, blocks)``, jitted, blocks precomputed (what the layer call does)
  x @ M         one dense ``(tokens, d) @ (d, d)`` matmul, ``M`` precomputed
  ref           "the reference's way", a literal JAX port of PEFT's BOFT (its path without the
                CUDA block-diagonal kernel): full ``(m k, b, b)`` params, skew part, Cayley by a
                batched solve (``solve(I + S, I - S, left=False)``), dense ``(d, d)`` block
                diagonals, ``(m, d, d)`` permutation-matrix buffers, ``P_i D_i P_i^T`` per factor by
                two dense matmuls, the factors multiplied into ``M``; then ``x @ M``
  build: ref    the reference's construction of ``M`` alone (from its params)
  build: ours   what a BOFT training step needs before ``rotate``: ``boft.cayley`` on the packed
                params -> the ``(m, k, b, b)`` blocks, nothing else
  build: dense  ``boft.rotation_matrix(boft.cayley(params))`` (dense ``M`` the structured way; for
                tests/notebooks/merging only)

Host memory: the script calls :func:`boft_jax.keep_freed_memory` before JAX runs, so XLA:CPU's
large buffers are reused instead of mapped and page-faulted in at every call (half of ``rotate``'s
time at d = 4096 with glibc's defaults); ``--system-malloc`` measures with glibc's defaults.

Times are medians over interleaved repeats (compile, warm up, then every repeat runs each
candidate once in turn).  Peak memory is XLA's compiled ``memory_analysis()``: temp + output bytes
(arguments - x, M, blocks, the reference's permutation buffers - excluded).  Every row is also
checked: ``rotate`` against ``x @ M`` and the reference's ``M`` against ``rotation_matrix``.

The reference costs ``2 d^3 (3m - 1)`` FLOPs to build ``M``: it is skipped where its estimate
exceeds ``--ref-max-gflop`` (default 60), except that its construction is timed once (one repeat)
at the issue's target shape d = 4096, m = 4, b = 8.

``--span-forms`` runs the study behind the span form's application (``span_rows``: one batched
matmul between two transposes of the activations) at the target shape: a grouped convolution, a
loop over column blocks, broadcast multiply-adds, and the adopted form's parts timed alone.

``--formulations`` runs the study behind the per-factor formulation of ``_factor_rows`` /
``_factor_cols`` instead: the previous einsum layout vs the adopted batched matmul (forward, and
forward + backward) vs other candidates, side by side.

Usage::

  python benchmarks/rotate.py                  # full grid, float32, 4096 tokens (~7 min on 2 idle cores)
  python benchmarks/rotate.py --quick          # small grid, < 1 minute
  python benchmarks/rotate.py --dtype bf16 --tokens 2048
  python benchmarks/rotate.py --formulations   # formulation study (~3-5 min on 2 cores)
  python benchmarks/rotate.py --span-forms     # span-form study at d 4096, m 4, b 8 (~2 min)
  python benchmarks/rotate.py --d 4096 --m 4 --b 8 --repeats 31 --no-target-ref --system-malloc
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

# Before numpy/jax load (as in tests/conftest.py): numpy's OpenBLAS worker threads spin and steal
# the cores from whatever is timed next on a busy machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import boft_jax as boft  # noqa: E402
from _util import (  # noqa: E402
    Candidate,
    add_malloc_flag,
    compiled_memory,
    fmt_mib,
    fmt_ms,
    fmt_ratio,
    interleaved_medians,
    interleaved_times,
    load_average,
    machine_description,
    markdown_table,
    medians,
    memory_stats,
    paired_ratio,
    target_verdict,
)

TARGET = (4096, 4, 8)  # (d, m, b) of the targets
TARGET_ROTATE_RATIO = 0.10  # rotate <= 10% of one dense (d x d) matmul on the same input
TARGET_BUILD_SPEEDUP = 100.0  # our construction >= 100x faster than the reference's

DTYPES = {"f32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16}


# --------------------------------------------------------------------------------------------
# The reference's way (PEFT BOFT, dense), ported literally
# --------------------------------------------------------------------------------------------
def reference_permutation_matrices(d: int, b: int, m: int) -> jax.Array:
    """PEFT's ``boft_P`` buffer: ``(m, d, d)`` with ``P_i[r, perm_i[r]] = 1``."""
    perms = boft.butterfly_permutations(d, b, m)
    P = np.zeros((m, d, d), np.float32)
    for i in range(m):
        P[i, np.arange(d), perms[i]] = 1.0
    return jnp.asarray(P)


def reference_rotation(R: jax.Array, P: jax.Array) -> jax.Array:
    """``M`` as PEFT's BOFT builds it from its full ``(m, k, b, b)`` params ``R`` and ``boft_P``."""
    m, k, b, _ = R.shape
    d = k * b
    data = R.reshape(m * k, b, b)
    skew = 0.5 * (data - jnp.swapaxes(data, 1, 2))  # cayley_batch
    eye = jnp.broadcast_to(jnp.eye(b, dtype=R.dtype), skew.shape)
    # torch.linalg.solve(I + S, I - S, left=False): X (I + S) = I - S  <=>  (I + S)^T X^T = (I - S)^T
    q = jnp.swapaxes(jnp.linalg.solve(jnp.swapaxes(eye + skew, 1, 2), jnp.swapaxes(eye - skew, 1, 2)), 1, 2)
    q = q.reshape(m, k, b, b)
    # torch.block_diag(*blocks) per factor: a dense (d, d) block-diagonal matrix
    block_diag = jnp.einsum("mkij,kl->mkilj", q, jnp.eye(k, dtype=q.dtype)).reshape(m, d, d)
    batch = jnp.matmul(block_diag, jnp.swapaxes(P, 1, 2))  # bmm(block_diag, P^T)
    batch = jnp.matmul(P, batch)  # bmm(P, .)
    M = batch[0]
    for i in range(1, m):
        M = batch[i] @ M
    return M


def reference_apply(x: jax.Array, R: jax.Array, P: jax.Array) -> jax.Array:
    return x @ reference_rotation(R, P).astype(x.dtype)


def reference_gflop(d: int, m: int, tokens: int, apply: bool = True) -> float:
    """Matmul FLOPs of the reference's construction (+ ``x @ M`` when ``apply``), in GFLOP."""
    build = 2 * d**3 * (2 * m + (m - 1))
    return (build + (2 * tokens * d * d if apply else 0)) / 1e9


# --------------------------------------------------------------------------------------------
# Main grid
# --------------------------------------------------------------------------------------------
def run_grid(ds, ms, bs, tokens, dtype, repeats, ref_max_gflop, big_ref_at_target) -> tuple[str, dict]:
    headers = [
        "d", "m", "b",
        "rotate ms", "x@M ms", "rotate / x@M",
        "ref (build+apply) ms", "ref / rotate",
        "build: ref ms", "build: ours ms", "build: dense ms", "ref / ours", "ref / dense",
        "peak MiB rotate", "peak MiB x@M", "peak MiB ref",
    ]
    rows, results = [], {}
    for d, m, b in itertools.product(ds, ms, bs):
        err = boft.structure_error(d, b, m)
        if err is not None:
            rows.append([d, m, b] + [f"invalid: {err}"] + [""] * (len(headers) - 4))
            continue
        k = d // b
        key = jax.random.key(d * 1000 + m * 100 + b)
        kx, kp = jax.random.split(key)
        x = jax.random.normal(kx, (tokens, d), jnp.float32).astype(dtype)
        params = 0.1 * jax.random.normal(kp, (m, k, boft.num_skew_params(b)), jnp.float32)
        R = boft.unpack_skew(params, b)  # reference's full params with the same skew part
        blocks = boft.cayley(params, b)
        M = boft.rotation_matrix(blocks)
        Md = M.astype(dtype)

        ref_gf = reference_gflop(d, m, tokens)
        ref_full = ref_gf <= ref_max_gflop
        ref_build_once = (not ref_full) and big_ref_at_target and (d, m, b) == TARGET
        P = reference_permutation_matrices(d, b, m) if (ref_full or ref_build_once) else None

        f_rot = jax.jit(lambda x, q: boft.rotate(x, q))
        f_dense = jax.jit(lambda x, M: x @ M)
        f_ref = jax.jit(reference_apply)
        f_ref_build = jax.jit(reference_rotation)
        f_ours = jax.jit(lambda p, b=b: boft.cayley(p, b))
        f_rotmat = jax.jit(lambda p, b=b: boft.rotation_matrix(boft.cayley(p, b)))

        cands = [
            Candidate("rotate", f_rot, (x, blocks)),
            Candidate("x@M", f_dense, (x, Md)),
            Candidate("build: ours", f_ours, (params,)),
            Candidate("build: dense", f_rotmat, (params,)),
        ]
        if ref_full:
            cands += [Candidate("ref", f_ref, (x, R, P)), Candidate("build: ref", f_ref_build, (R, P))]
        t0 = time.perf_counter()
        comp: dict = {}
        n_rep = repeats if repeats is not None else (3 if d >= 4096 else 5)
        raw = interleaved_times(cands, repeats=n_rep, compiled_out=comp)
        times = medians(raw)
        M_ref = None
        if ref_build_once:  # one timed call, right after the others; its compilation is not timed
            g = jax.jit(reference_rotation).lower(R, P).compile()
            t1 = time.perf_counter()
            M_ref = jax.block_until_ready(g(R, P))
            times["build: ref"] = time.perf_counter() - t1
        elif ref_full:
            M_ref = comp["build: ref"](R, P)
        wall = time.perf_counter() - t0

        # correctness (outside the timing): rotate vs x @ M, the reference's M vs ours
        # Both at full float32 precision: the timed calls use JAX's default precision, which is
        # TF32 for float32 matmuls on recent NVIDIA GPUs (relative errors ~5e-4, measured on an H200).
        hi = jax.lax.Precision.HIGHEST
        y_rot = jax.jit(lambda x, q: boft.rotate(x, q, precision=hi))(x, blocks).astype(jnp.float32)
        y_dense = jax.jit(lambda x, M: jnp.matmul(x, M, precision=hi))(x, Md).astype(jnp.float32)
        rot_err = float(jnp.max(jnp.abs(y_rot - y_dense))) / float(jnp.max(jnp.abs(y_dense)))
        tol = 1e-4 if dtype == jnp.float32 else 5e-2
        assert rot_err < tol, f"rotate disagrees with x @ M at {(d, m, b)}: relative error {rot_err:.2e}"
        if M_ref is not None:
            ref_err = float(jnp.max(jnp.abs(M_ref - M)))
            assert ref_err < 1e-4, f"reference M disagrees with rotation_matrix at {(d, m, b)}: {ref_err:.2e}"
        del y_rot, y_dense, M_ref

        mem = {
            "rotate": memory_stats(comp["rotate"]),
            "x@M": memory_stats(comp["x@M"]),
            "ref": memory_stats(comp["ref"]) if ref_full
            else compiled_memory(f_ref, x, R, P) if P is not None else None,
        }
        t = times.get
        ratio = lambda a, c: (t(a) / t(c)) if (t(a) is not None and t(c) is not None) else None  # noqa: E731
        skipped = f"skipped (~{ref_gf:.0f} GFLOP)"
        row = [
            d, m, b,
            fmt_ms(t("rotate")), fmt_ms(t("x@M")), fmt_ratio(ratio("rotate", "x@M")),
            fmt_ms(t("ref")) if ref_full else skipped,
            fmt_ratio(ratio("ref", "rotate")) if ref_full else "-",
            (fmt_ms(t("build: ref")) + (" (1 rep)" if ref_build_once else "")) if P is not None
            else f"skipped (~{reference_gflop(d, m, tokens, apply=False):.0f} GFLOP)",
            fmt_ms(t("build: ours")), fmt_ms(t("build: dense")),
            fmt_ratio(ratio("build: ref", "build: ours")), fmt_ratio(ratio("build: ref", "build: dense")),
            fmt_mib(mem["rotate"].peak if mem["rotate"] else None),
            fmt_mib(mem["x@M"].peak if mem["x@M"] else None),
            fmt_mib(mem["ref"].peak if mem["ref"] else None) if P is not None else "-",
        ]
        rows.append(row)
        results[(d, m, b)] = dict(times=times, raw=raw, mem=mem)
        print(
            f"  d={d} m={m} b={b}: rotate {fmt_ms(t('rotate'))} ms, x@M {fmt_ms(t('x@M'))} ms,"
            f" ratio {fmt_ratio(ratio('rotate', 'x@M'))}; timing {wall:.1f} s; load {load_average()}",
            file=sys.stderr,
            flush=True,
        )
        del P
    return markdown_table(headers, rows), results


def verdicts(results: dict) -> list[str]:
    r = results.get(TARGET)
    if r is None:
        return [f"target shape d, m, b = {TARGET} not in this grid: no verdict"]
    t = r["times"]
    out = []
    ratio = t["rotate"] / t["x@M"]
    line = (
        f"rotate at d = 4096, m = 4, b = 8: {ratio:.1%} of one dense 4096 x 4096 matmul"
        f" ({fmt_ms(t['rotate'])} ms vs {fmt_ms(t['x@M'])} ms, medians)"
    )
    pr = paired_ratio(r["raw"]["rotate"], r["raw"]["x@M"])
    if pr is None:  # too few rounds for an interval: the ratio of medians decides
        word = "met" if ratio <= TARGET_ROTATE_RATIO else "missed"
        line += f"; target <= {TARGET_ROTATE_RATIO:.0%}: {word} (ratio of medians, < 3 rounds)"
    else:
        line += (
            f"; paired per round {pr[0]:.1%} [90% CI {pr[1]:.1%}-{pr[2]:.1%}];"
            f" target <= {TARGET_ROTATE_RATIO:.0%}: {target_verdict(pr, TARGET_ROTATE_RATIO)}"
        )
    out.append(line)
    if "build: ref" in t:
        sp = t["build: ref"] / t["build: ours"]
        sp_dense = t["build: ref"] / t["build: dense"]
        out.append(
            f"construction at d = 4096, m = 4, b = 8: reference {fmt_ms(t['build: ref'])} ms vs ours"
            f" (cayley -> blocks) {fmt_ms(t['build: ours'])} ms = {sp:,.0f}x faster; target >="
            f" {TARGET_BUILD_SPEEDUP:.0f}x: {'met' if sp >= TARGET_BUILD_SPEEDUP else 'missed'}"
            f" (even the dense boft.rotation_matrix is {sp_dense:,.0f}x faster: {fmt_ms(t['build: dense'])} ms)"
        )
    else:
        out.append("construction target: reference not run at the target shape (no verdict)")
    return out


# --------------------------------------------------------------------------------------------
# Formulation study for _factor_rows / _factor_cols
# --------------------------------------------------------------------------------------------
def _rows_einsum(x, q, level):
    """The previous ``_factor_rows``: one einsum with the block axes in the middle."""
    k, b, _ = q.shape
    lead = x.shape[:-1]
    if level == 0:
        return jnp.einsum("...kc,kce->...ke", x.reshape(*lead, k, b), q).reshape(x.shape)
    g, h = 2**level, b // 2
    a = k // g
    xv, qv = x.reshape(*lead, a, 2, g, h), q.reshape(a, g, 2, h, 2, h)
    return jnp.einsum("...acgh,agchex->...aegx", xv, qv).reshape(x.shape)


def _cols_einsum(w, q, level):
    """The previous ``_factor_cols``."""
    k, b, _ = q.shape
    n = w.shape[1]
    if level == 0:
        return jnp.einsum("kec,kcn->ken", q, w.reshape(k, b, n)).reshape(w.shape)
    g, h = 2**level, b // 2
    a = k // g
    wv, qv = w.reshape(a, 2, g, h, n), q.reshape(a, g, 2, h, 2, h)
    return jnp.einsum("agexch,acghn->aegxn", qv, wv).reshape(w.shape)


def _rows_dense_chunks(x, q, level):
    """Factor ``level`` as ``d / (b 2^level)`` dense ``(b 2^level)^2`` chunks: 2^level x the FLOPs."""
    k, b, _ = q.shape
    lead = x.shape[:-1]
    g, h = 2**level, b // 2
    if level == 0:
        return _rows_einsum(x, q, 0)
    a, C = k // g, b * g
    qv = q.reshape(a, g, 2, h, 2, h)
    W = jnp.einsum("agchex,gG->acgheGx", qv, jnp.eye(g, dtype=q.dtype)).reshape(a, C, C)
    return jnp.einsum("...ac,acd->...ad", x.reshape(*lead, a, C), W).reshape(x.shape)


def _rows_broadcast_sum(x, q, level):
    """Unrolled broadcast multiply + add over the ``b`` contraction terms (one loop fusion)."""
    k, b, _ = q.shape
    lead = x.shape[:-1]
    if level == 0:
        xv, y = x.reshape(*lead, k, b), 0
        for c in range(b):
            y = y + xv[..., c : c + 1] * q[:, c, :]
        return y.reshape(x.shape)
    g, h = 2**level, b // 2
    a = k // g
    xv = x.reshape(*lead, a, 2, g, h)
    qv = q.reshape(a, g, 2, h, 2, h).transpose(2, 3, 0, 4, 1, 5)  # (c, h, a, e, g, x)
    y = 0
    for c in range(2):
        for hh in range(h):
            y = y + xv[..., :, c : c + 1, :, hh : hh + 1] * qv[c, hh]
    return y.reshape(x.shape)


def _chain_rows(factor):
    def rot(x, blocks):
        for i in reversed(range(blocks.shape[0])):
            x = factor(x, blocks[i], i)
        return x

    return rot


def _chain_cols(factor):
    def rot(w, blocks):
        for i in range(blocks.shape[0]):
            w = factor(w, blocks[i], i)
        return w

    return rot


def _token_tiled(tile):
    """Rotate-level alternative: all m factors on one tile of ``tile`` tokens at a time (lax.map)."""

    def rot(x, blocks):
        n, d = x.shape
        if n % tile:
            return boft.rotate(x, blocks)
        return jax.lax.map(lambda xt: boft.rotate(xt, blocks), x.reshape(n // tile, tile, d)).reshape(n, d)

    return rot


def _fused_chunks(x, blocks):
    """Rotate-level alternative: ``M`` is block diagonal with chunks of ``C = b 2^(m-1)`` features;
    build those ``(d / C, C, C)`` chunks (cheap) and apply them in one batched matmul."""
    m, k, b, _ = blocks.shape
    d, C = k * b, b * 2 ** (m - 1)
    A = d // C
    eye_rows = jnp.tile(jnp.eye(C, dtype=blocks.dtype), (1, A))  # (C, d): e_r in every chunk
    chunks = boft.rotate(eye_rows, blocks).reshape(C, A, C).transpose(1, 0, 2)  # (A, C, C)
    n = x.shape[0]
    return jnp.einsum("nac,acd->nad", x.reshape(n, A, C), chunks).reshape(x.shape)


def _grad(rot):
    def g(x, blocks, ct):
        return jax.grad(lambda x, q: jnp.vdot(rot(x, q), ct), argnums=(0, 1))(x, blocks)

    return g


def run_formulations(shapes, tokens, dtype, repeats) -> str:
    headers = ["d", "m", "b", "candidate", "ms", "/ x@M", "/ einsum (before)"]
    rows = []
    for d, m, b in shapes:
        k = d // b
        kx, kp, kc = jax.random.split(jax.random.key(d + m + b), 3)
        x = jax.random.normal(kx, (tokens, d), jnp.float32).astype(dtype)
        ct = jax.random.normal(kc, (tokens, d), jnp.float32).astype(dtype)
        blocks = boft.cayley(0.1 * jax.random.normal(kp, (m, k, boft.num_skew_params(b))), b).astype(dtype)
        M = boft.rotation_matrix(blocks.astype(jnp.float32)).astype(dtype)
        K = jax.random.normal(kc, (d, d), jnp.float32).astype(dtype)
        fwd = {
            "einsum (before)": _chain_rows(_rows_einsum),
            "batched matmul (adopted: boft.rotate)": lambda x, q: boft.rotate(x, q),
            "dense chunks per factor": _chain_rows(_rows_dense_chunks),
            "broadcast multiply+sum": _chain_rows(_rows_broadcast_sum),
            "[rotate-level] token tiles of 256": _token_tiled(256),
            "[rotate-level] fused chunk matrix": _fused_chunks,
        }
        cands = [Candidate(n, f, (x, blocks)) for n, f in fwd.items()]
        cands.append(Candidate("x@M", lambda x, M: x @ M, (x, M)))
        cands += [
            Candidate("fwd+bwd einsum (before)", _grad(_chain_rows(_rows_einsum)), (x, blocks, ct)),
            Candidate("fwd+bwd batched matmul (adopted)", _grad(lambda x, q: boft.rotate(x, q)), (x, blocks, ct)),
            Candidate("M K: einsum (before)", _chain_cols(_cols_einsum), (K, blocks)),
            Candidate("M K: batched matmul (adopted: boft.rotate_kernel)", lambda w, q: boft.rotate_kernel(w, q), (K, blocks)),
        ]
        y_ref = boft.rotate(x, blocks).astype(jnp.float32)
        for c in cands[:6]:
            err = float(jnp.max(jnp.abs(jax.jit(c.fn)(*c.args).astype(jnp.float32) - y_ref)))
            assert err < (1e-3 if dtype == jnp.float32 else 1e-1), (c.name, err)
        t0 = time.perf_counter()
        times = interleaved_medians(cands, repeats=repeats)
        print(f"  d={d} m={m} b={b}: {time.perf_counter() - t0:.1f} s; load {load_average()}", file=sys.stderr, flush=True)
        base = {"fwd+bwd": "fwd+bwd einsum (before)", "M K": "M K: einsum (before)"}
        for c in cands:
            before = base.get(c.name.split(":")[0].split(" einsum")[0].split(" batched")[0], "einsum (before)")
            rows.append([
                d, m, b, c.name, fmt_ms(times[c.name]),
                fmt_ratio(times[c.name] / times["x@M"]) if not c.name.startswith(("fwd+bwd", "M K")) else "-",
                fmt_ratio(times[c.name] / times[before]) if c.name != "x@M" else "-",
            ])
    return markdown_table(headers, rows, align="rrrlrrr")


# --------------------------------------------------------------------------------------------
# Span-form study: other ways to apply the (G, S, S) diagonal blocks of M to (T, d) rows
# --------------------------------------------------------------------------------------------
def _span_grouped_conv(x, B):
    """``x M`` as a 1-D convolution of width 1 with ``G`` feature groups (XLA's grouped conv)."""
    g, s, _ = B.shape
    kernel = B.transpose(1, 0, 2).reshape(1, s, g * s)  # W, I / groups, O: kernel[0, c, gS + e] = B[g, c, e]
    y = jax.lax.conv_general_dilated(
        x[:, None, :], kernel, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=g
    )
    return y[:, 0, :]


def _span_column_loop(unroll):
    """``x M`` one ``S``-column block at a time: ``fori_loop`` over ``G`` of slice, ``(T, S) @ (S, S)``,
    and an in-place update of the output (no transposes; a serial loop of small matmuls)."""

    def rot(x, B):
        g, s, _ = B.shape

        def body(i, out):
            xs = jax.lax.dynamic_slice_in_dim(x, i * s, s, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(out, xs @ B[i], i * s, axis=1)

        return jax.lax.fori_loop(0, g, body, jnp.zeros_like(x), unroll=unroll)

    return rot


def _span_elementwise(x, B):
    """``x M`` as ``S`` broadcast multiply-adds in one fused loop: the layers' own form for
    ``S <= 16`` (``boft_jax._ops._rows``), its threshold lifted to the study's ``S`` while tracing."""
    from boft_jax import _ops

    saved, _ops._EW_MAX_SPAN = _ops._EW_MAX_SPAN, B.shape[1]
    try:
        return _ops._rows(x, B, False)
    finally:
        _ops._EW_MAX_SPAN = saved


def run_span_forms(shapes, tokens, dtype, repeats) -> str:
    """Paired ratios (median per round, 90% interval) of each form to the adopted span form and to
    ``x @ M``; plus the adopted form's parts timed alone (input transpose, batched matmul, output
    transpose) against a plain elementwise pass over ``x`` (one read, one write)."""
    from boft_jax.butterfly import span_blocks, span_rows

    headers = ["d", "m", "b", "S", "candidate", "ms", "paired / span form [90% CI]", "paired / x@M"]
    rows = []
    for d, m, b in shapes:
        k = d // b
        kx, kp, km = jax.random.split(jax.random.key(d + m + b), 3)
        x = jax.random.normal(kx, (tokens, d), jnp.float32).astype(dtype)
        blocks = boft.cayley(0.1 * jax.random.normal(kp, (m, k, boft.num_skew_params(b))), b)
        B = span_blocks(blocks).astype(dtype)
        g, s, _ = B.shape
        M = boft.rotation_matrix(blocks).astype(dtype)
        xt = x.reshape(tokens, g, s).transpose(1, 0, 2) + 0  # the batched matmul's operand, materialized
        forms = {
            "span form (adopted: span_rows)": (lambda x, B: span_rows(x, B), (x, B)),
            "boft.rotate as shipped (incl. building B)": (lambda x, q: boft.rotate(x, q), (x, blocks.astype(dtype))),
            "grouped 1-D convolution": (_span_grouped_conv, (x, B)),
            "column-block fori_loop": (_span_column_loop(1), (x, B)),
            "column-block fori_loop, unroll 4": (_span_column_loop(4), (x, B)),
            f"broadcast multiply-adds (S = {s})": (_span_elementwise, (x, B)),
            "part: transpose in": (lambda x: x.reshape(tokens, g, s).transpose(1, 0, 2), (x,)),
            "part: batched matmul": (lambda xt, B: jnp.matmul(xt, B), (xt, B)),
            "part: transpose out": (lambda y: y.transpose(1, 0, 2).reshape(tokens, d), (xt,)),
            "part: one elementwise pass (2 x)": (lambda x: x * 2, (x,)),
            "x@M": (lambda x, M: x @ M, (x, M)),
        }
        cands = [Candidate(n, f, a) for n, (f, a) in forms.items()]
        y_ref = (x.astype(jnp.float32) @ M.astype(jnp.float32))
        tol = 1e-3 if dtype == jnp.float32 else 1e-1
        for c in cands[:6]:
            err = float(jnp.max(jnp.abs(jax.jit(c.fn)(*c.args).astype(jnp.float32) - y_ref)))
            assert err < tol, (c.name, err)
        t0 = time.perf_counter()
        times = interleaved_times(cands, repeats=repeats)
        print(f"  d={d} m={m} b={b}: {time.perf_counter() - t0:.1f} s; load {load_average()}", file=sys.stderr, flush=True)
        span = times["span form (adopted: span_rows)"]
        for c in cands:
            t = times[c.name]
            vs_span = paired_ratio(t, span)
            vs_dense = paired_ratio(t, times["x@M"])
            rows.append([
                d, m, b, s, c.name, fmt_ms(statistics.median(t)),
                "-" if vs_span is None or c.name.startswith("span form") else "%.3f [%.3f, %.3f]" % vs_span,
                "-" if vs_dense is None or c.name == "x@M" else "%.3f" % vs_dense[0],
            ])
    return markdown_table(headers, rows, align="rrrrlrrr")


# --------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small grid (d 768/1024, m 1/4, b 8, 1024 tokens, 3 repeats)")
    ap.add_argument("--dtype", default="f32", choices=sorted(DTYPES), help="activation dtype (blocks stay float32)")
    ap.add_argument("--tokens", type=int, default=None, help="rows of x (default 4096; 1024 with --quick)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved repeats (default 5, 3 for d >= 4096 where one x@M takes seconds; 3 with --quick)")
    ap.add_argument("--d", type=int, nargs="+", default=None, help="feature sizes (default 768 1024 4096)")
    ap.add_argument("--m", type=int, nargs="+", default=None, help="factor counts (default 1 2 4)")
    ap.add_argument("--b", type=int, nargs="+", default=None, help="block sizes (default 4 8 16)")
    ap.add_argument("--ref-max-gflop", type=float, default=60.0,
                    help="skip the reference where build+apply exceeds this many GFLOP (default 60)")
    ap.add_argument("--no-target-ref", action="store_true",
                    help="do not time the reference's construction once at d=4096, m=4, b=8")
    ap.add_argument("--formulations", action="store_true", help="run the per-factor formulation study instead")
    ap.add_argument("--span-forms", action="store_true",
                    help="run the study of ways to apply the span blocks instead (default shape d 4096, m 4, b 8)")
    add_malloc_flag(ap)
    args = ap.parse_args(argv)
    allocator = "host allocator: " + boft.host_memory.configure(args.system_malloc)

    dtype = DTYPES[args.dtype]
    tokens = args.tokens or (1024 if args.quick else 4096)
    repeats = args.repeats or (3 if args.quick else None)  # None: 5, or 3 for d >= 4096
    cmd = "python benchmarks/rotate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# {cmd.strip()}")
    print(f"# {machine_description()}; load average at start {load_average()}")
    print(f"# {allocator}")
    reps = repeats or "5 (3 for d >= 4096)"
    print(f"# tokens = {tokens}, activations {jnp.dtype(dtype).name}, blocks float32, {reps} interleaved repeats, medians\n")

    start = time.perf_counter()
    if args.span_forms:
        shapes = [s for s in itertools.product(args.d or [4096], args.m or [4], args.b or [8])
                  if boft.structure_error(s[0], s[2], s[1]) is None and s[1] > 1]
        print(run_span_forms(shapes, tokens, dtype, repeats or 11))
    elif args.formulations:
        shapes = [(1024, 2, 8), (4096, 1, 8), (4096, 4, 8)] if args.quick else [
            (768, 2, 8), (1024, 4, 4), (4096, 1, 16), (4096, 2, 8), (4096, 4, 8), (4096, 4, 16)]
        if args.d or args.m or args.b:
            shapes = [s for s in itertools.product(args.d or [4096], args.m or [4], args.b or [8])
                      if boft.structure_error(s[0], s[2], s[1]) is None]
        print(run_formulations(shapes, tokens, dtype, repeats or 5))
    else:
        ds = args.d or ([768, 1024] if args.quick else [768, 1024, 4096])
        ms = args.m or ([1, 4] if args.quick else [1, 2, 4])
        bs = args.b or ([8] if args.quick else [4, 8, 16])
        table, results = run_grid(ds, ms, bs, tokens, dtype, repeats, args.ref_max_gflop, not args.no_target_ref)
        print(table)
        print()
        for v in verdicts(results):
            print(f"- {v}")
    print(f"\n# total wall time {time.perf_counter() - start:.0f} s; load average at end {load_average()}")


if __name__ == "__main__":
    main()
