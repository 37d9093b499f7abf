"""Issue 3, where a BOFT layer's time goes: forward + backward of chains of adapted Dense layers.

The train-step benchmark (``train_step.py``) times whole steps; this one splits a step's BOFT cost
into parts, so that a short device lease can show which part to change.  Each candidate is one
jitted forward + backward (``jax.vjp`` with a random cotangent) of a chain of ``--copies`` layers
of one of two shapes:

  attn   ``copies`` Dense layers 768 -> 768 (query/key/value/out of ViT-B)
  mlp    ``copies / 2`` pairs 768 -> 3072 -> 768 (fc1, fc2)

on ``--tokens`` token rows (default 256 x 197 = 50,432: ViT-B/16 at batch 256).  Candidates:

  frozen             the plain chain, gradient w.r.t. the input only (the floor)
  lora               LoRA r = 8 (``x K + (x A) B * 2``, with ``train_step.py``'s tuned backward: the
                     baseline of issue 3's targets), gradients w.r.t. x, A, B; the H200 run of
                     2026-11-30 used plain autodiff here (on that GPU the two LoRA steps were
                     within 0.1%)
  boft m=M weight    ``boft.wrap`` with ``mode="weight"``: the library's path, gradients w.r.t. x
                     and the adapter (skew blocks, scale)
  boft m=M input     the same with ``mode="input"``
  ... loop           the weight path with the Cayley elimination as a ``fori_loop`` (the library's
                     form on CPU and TPU; what it ran everywhere before this benchmark's GPU run)
  ... unrolled       the same, with the elimination unrolled (the library's form on CUDA / ROCm
                     since an H200 run of this benchmark measured the loop 3-5.5x slower)
  ... bg chunked     the weight path with the block gradients ``x_g^T u_g`` computed over token
                     chunks (batch ``chunks x G`` matmuls, then a sum) instead of one ``G``-batched
                     matmul over all tokens (does the long contraction starve the device?)
  ... bg direct      the block gradients as one einsum on the ``(T, G, S)`` views (XLA chooses
                     the layouts) instead of explicit ``(G, T, S)`` transposes
  ... mm             batched matmuls for every block size, no broadcast multiply-adds (as
                     ``train_step.py --matmul-forms``; this also switches the skew unpacking of the
                     Cayley derivative to its gather form)
  construct m=M      only the adapters' construction (packed skew -> Cayley -> span blocks) and its
                     backward, for ``copies`` independent adapters (``... loop`` / ``unrolled`` /
                     ``mm`` likewise)

Times: all candidates are compiled and warmed up, then timed in interleaved rounds; each timing is
``--inner`` back-to-back calls (asynchronous dispatch hides the host) and the table shows the median
per call and per layer, and each BOFT variant's extra time over LoRA per layer.  Outputs of the
variants of one ``m`` are checked against its "weight" candidate first.

Usage::

  python benchmarks/layer_ops.py --quick                     # CPU smoke run (small sizes)
  python benchmarks/layer_ops.py --dtype bfloat16            # GPU: ViT-B/16 at batch 256
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import boft_jax as boft  # noqa: E402
from boft_jax import _ops, orthogonal  # noqa: E402
from boft_jax.orthogonal import cayley, num_skew_params  # noqa: E402
from _util import machine_description, markdown_table, random_adapter  # noqa: E402
from train_step import _lora_branch, matmul_forms  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Alternative formulations, patched in while a candidate is traced
# ---------------------------------------------------------------------------------------------
def _chunks(t: int, target: int = 1024) -> int:
    """The number of token chunks: the divisor of ``t`` whose chunk length is nearest ``target``."""
    divisors = [c for c in range(1, t + 1) if t % c == 0]
    return min(divisors, key=lambda c: abs(t // c - target))


def _block_grad_chunked(x, u, s, precision=None):
    t, d = x.shape
    sg = _ops.block_grad_width(d, s)
    gg, c = d // sg, _chunks(t)
    acc = jnp.promote_types(jnp.float32, jnp.result_type(x.dtype, u.dtype))
    xv = x.reshape(c, t // c, gg, sg)
    uv = u.reshape(c, t // c, gg, sg)
    db = jnp.einsum("ctgr,ctgk->cgrk", xv, uv, precision=precision, preferred_element_type=acc).sum(0)
    return _ops.diagonal_blocks(db, s)


def _block_grad_direct(x, u, s, precision=None):
    t, d = x.shape
    sg = _ops.block_grad_width(d, s)
    gg = d // sg
    acc = jnp.promote_types(jnp.float32, jnp.result_type(x.dtype, u.dtype))
    db = jnp.einsum("tgr,tgk->grk", x.reshape(t, gg, sg), u.reshape(t, gg, sg), precision=precision,
                    preferred_element_type=acc)
    return _ops.diagonal_blocks(db, s)


@contextlib.contextmanager
def _patched(mod, attr: str, value):
    saved = getattr(mod, attr)
    setattr(mod, attr, value)
    try:
        yield
    finally:
        setattr(mod, attr, saved)


# Variant name suffix -> context manager factory, entered while a candidate is traced and compiled.
VARIANTS = {
    "": contextlib.nullcontext,
    " loop": lambda: _patched(orthogonal, "_invert_identity_plus_skew", orthogonal._invert_loop),
    " unrolled": lambda: _patched(orthogonal, "_invert_identity_plus_skew", orthogonal._invert_unrolled),
    " bg chunked": lambda: _patched(_ops, "_block_grad", _block_grad_chunked),
    " bg direct": lambda: _patched(_ops, "_block_grad", _block_grad_direct),
    " mm": matmul_forms,
}


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
class Chain(nn.Module):
    widths: tuple[int, ...]
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i, w in enumerate(self.widths):
            x = nn.Dense(w, use_bias=False, dtype=self.dtype, param_dtype=self.dtype, name=f"layer{i}")(x)
        return x


class LoraChain(nn.Module):
    widths: tuple[int, ...]
    dtype: jnp.dtype = jnp.float32
    rank: int = 8

    @nn.compact
    def __call__(self, x):
        for i, w in enumerate(self.widths):
            k = self.param(f"kernel{i}", nn.initializers.lecun_normal(), (x.shape[-1], w), self.dtype)
            a = self.param(f"a{i}", nn.initializers.normal(0.02), (x.shape[-1], self.rank), self.dtype)
            b = self.param(f"b{i}", nn.initializers.normal(0.02), (self.rank, w), self.dtype)
            x = x @ k + _lora_branch(x, a, b) * 2.0  # train_step's tuned LoRA (the #3 targets' baseline)
        return x


def _split_lora(params):
    frozen = {k: v for k, v in params.items() if k.startswith("kernel")}
    return frozen, {k: v for k, v in params.items() if not k.startswith("kernel")}


def candidates(shape: str, copies: int, tokens: int, dtype, factors, block_size: int, variants):
    """([(name, fn, args, output reference group or None, variant context factory)], layers) for
    one chain shape."""
    widths = (768,) * copies if shape == "attn" else (3072, 768) * (copies // 2)
    d0 = 768
    x = jax.random.normal(jax.random.key(1), (tokens, d0), dtype)
    dy = jax.random.normal(jax.random.key(2), (tokens, widths[-1]), dtype)
    base = Chain(widths, dtype)
    frozen = jax.jit(base.init)(jax.random.key(0), x[:2])["params"]
    out = []

    def frozen_step(p, x, dy):
        y, pull = jax.vjp(lambda x: base.apply({"params": p}, x), x)
        return y, pull(dy)[0]

    out.append(("frozen", frozen_step, (frozen, x, dy), None, contextlib.nullcontext))

    lora = LoraChain(widths, dtype)
    lp = jax.jit(lora.init)(jax.random.key(0), x[:2])["params"]
    lf, la = _split_lora(lp)

    def lora_step(f, a, x, dy):
        y, pull = jax.vjp(lambda a, x: lora.apply({"params": {**f, **a}}, x), a, x)
        return y, pull(dy)

    out.append(("lora", lora_step, (lf, la, x, dy), None, contextlib.nullcontext))

    for m in factors:
        for mode in ("weight", "input"):
            for variant in variants:
                if variant and mode == "input":
                    continue
                cfg = boft.BOFTConfig(block_size=block_size, n_factors=m, mode=mode)
                model = boft.wrap(base, cfg)
                template = boft.split(jax.eval_shape(model.init, jax.random.key(0), x[:2])["params"], cfg)[1]
                adapter = random_adapter(template, 3, 0.05)

                def step(f, a, x, dy, model=model):
                    y, pull = jax.vjp(lambda a, x: model.apply({"params": boft.combine(f, a)}, x), a, x)
                    return y, pull(dy)

                out.append((f"boft m={m} {mode}{variant}", step, (frozen, adapter, x, dy), f"m={m}", VARIANTS[variant]))
        # The adapters' construction alone, for `copies` adapters (768-wide, as the layers' inputs).
        k = 768 // block_size
        skews = [0.05 * jax.random.normal(jax.random.key(10 + i), (m, k, num_skew_params(block_size)), jnp.float32)
                 for i in range(copies)]
        cot = [jax.random.normal(jax.random.key(40 + i), jax.eval_shape(
            lambda s: _ops.rotation_operand(cayley(s)), skews[0]).shape, jnp.float32) for i in range(copies)]
        for variant in [v for v in variants if v in ("", " loop", " unrolled", " mm")]:
            def construct(skews, cot):
                ys, pull = jax.vjp(lambda ss: [_ops.rotation_operand(cayley(s)) for s in ss], skews)
                return ys, pull(cot)

            out.append((f"construct m={m}{variant}", construct, (skews, cot), f"c m={m}", VARIANTS[variant]))
    return out, len(widths)


def timed(fn, args, inner: int) -> float:
    t0 = time.perf_counter()
    r = None
    for _ in range(inner):
        r = fn(*args)
    jax.block_until_ready(r)
    return (time.perf_counter() - t0) / inner


def _max_rel(a, b) -> float:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    worst = 0.0
    for p, q in zip(la, lb):
        p, q = np.asarray(p, np.float32), np.asarray(q, np.float32)
        worst = max(worst, float(np.abs(p - q).max() / max(np.abs(q).max(), 1e-30)))
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256 * 197)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--copies", type=int, default=4, help="layers per chain (even)")
    ap.add_argument("--shapes", nargs="+", default=["attn", "mlp"], choices=["attn", "mlp"])
    ap.add_argument("--factors", type=int, nargs="+", default=None, help="m values (default 1 2 4; 1 2 with --quick)")
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--variants", nargs="*", default=["loop", "unrolled", "bg chunked", "bg direct", "mm"],
                    choices=["loop", "unrolled", "bg chunked", "bg direct", "mm"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=10, help="back-to-back calls per timing")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: 394 tokens, 3 repeats of 2 calls")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.repeats, args.inner = 394, 3, 2
    args.factors = args.factors or ([1, 2] if args.quick else [1, 2, 4])
    if args.copies % 2:
        raise SystemExit(f"--copies must be even (mlp chains are fc1/fc2 pairs), got {args.copies}")
    dtype = jnp.dtype(args.dtype)
    variants = [""] + [" " + v for v in args.variants]
    print(f"# layer_ops: {args.tokens} tokens, {args.dtype}, chains of {args.copies} layers, b={args.block_size},"
          f" m in {args.factors}; {args.repeats} rounds x {args.inner} calls")
    print(f"# {machine_description()}")
    for shape in args.shapes:
        t0 = time.perf_counter()
        cands, layers = candidates(shape, args.copies, args.tokens, dtype, args.factors, args.block_size, variants)
        compiled, results = [], {}
        for name, fn, cargs, _, variant in cands:
            t1 = time.perf_counter()
            jax.clear_caches()  # traces of the library's inner functions are cached; variants must re-trace
            with variant():
                c = jax.jit(fn).lower(*cargs).compile()
            results[name] = c(*cargs)
            jax.block_until_ready(results[name])
            compiled.append(c)
            loops = c.as_text().count(" while(")
            print(f"#   {shape}: compiled {name} in {time.perf_counter() - t1:.1f} s ({loops} while loops)", flush=True)
        # Every variant of one m against its library path (weight mode); inputs and gradients.
        for name, _, _, group, _ in cands:
            if group is None:
                continue
            ref = f"boft {group} weight" if not group.startswith("c ") else f"construct {group[2:]}"
            if name != ref:
                err = _max_rel(results[name], results[ref])
                print(f"#   {shape}: {name} vs {ref}: max rel diff {err:.1e}")
                assert err < (5e-2 if dtype == jnp.bfloat16 else 1e-3), (name, err)
        times = {name: [] for name, *_ in cands}
        for _ in range(args.repeats):
            for (name, _, cargs, _, _), c in zip(cands, compiled):
                times[name].append(timed(c, cargs, args.inner))
        med = {k: statistics.median(v) for k, v in times.items()}
        lora = med["lora"]
        rows = []
        for name, *_ in cands:
            per = med[name] / layers
            extra = "" if name in ("frozen", "lora") or name.startswith("construct") else f"{(med[name] - lora) / layers * 1e6:.0f}"
            rows.append([name, f"{med[name] * 1e3:.3f}", f"{per * 1e6:.0f}", f"{med[name] / lora:.3f}", extra])
        print(f"\n## {shape}: {layers} layers ({'768->768' if shape == 'attn' else '768->3072->768'}), "
              f"{time.perf_counter() - t0:.0f} s\n")
        print(markdown_table(["candidate", "ms / call", "us / layer", "x lora", "extra us / layer over lora"], rows))
        print(flush=True)


if __name__ == "__main__":
    main()
