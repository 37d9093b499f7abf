"""Issue 3: one training step of a ViT-B/16-shaped model: frozen floor, LoRA, BOFT, naive PEFT port.

Model: random weights, hidden 768, MLP 3072, 12 heads, pre-LN blocks with separate
query/key/value/out Dense layers (the Hugging Face ViT layout), 197 tokens per image (CLS + 14x14
patches; the input is the patch embedding output), final LayerNorm and a frozen 1000-way head on the
CLS token.  Adapters on query, key, value, attention out, fc1 and fc2 of every block.

A train step = forward + backward w.r.t. the adapter params only + ``optax.adamw`` update, jitted,
adapter and optimizer state donated.  Every variant goes through ``flax.linen.intercept_methods``:

  frozen       forward + gradient w.r.t. the input embeddings only (no params train): the floor
  lora         minimal LoRA written here, r = 8, alpha = 16: ``y = x K + (x A) B * alpha / r``
  boft m=..    boft_jax with block_size = b (default 8), n_factors = m, mode input / weight / auto
  peft m=..    naive JAX port of PEFT's dense construction: Cayley on full (m k, b, b) params,
               dense block diagonals, (m, d, d) permutation matrices (buffers), ``P B P^T`` per
               factor, multiplied into ``M``, then ``x @ ((M K) * s)``

Times are medians over interleaved repeats (all candidates are compiled first, then each repeat
runs every candidate once, in turn, each round starting one candidate later than the one before),
so machine noise hits them alike.  "paired vs LoRA" is the median over repeats of each repeat's
own ratio to the LoRA step of the same round, with a 90% bootstrap interval over rounds; the
verdict lines printed at the end call a time target met or missed only when that whole interval
is on one side of it.  That interval covers the noise within one run only: the same command on
another day or VM moves the ratios by more (BENCHMARKS.md gives the spread over runs).  Memory is
XLA's compiled ``memory_analysis()``: "peak" = temp + output - aliased bytes of the step, what
it allocates beyond its arguments (the donated outputs, new adapter and optimizer state, reuse
their arguments' buffers); the memory target is judged on it.  "args" are the arguments (frozen
weights, adapter, optimizer state; for the naive PEFT port also its (m, d, d) permutation
buffers, so its peak leaves those out), "args+peak" everything live.  Host memory: :func:`boft_jax.keep_freed_memory` is
applied before JAX runs (as ``train.finetune`` does on a CPU); ``--system-malloc`` keeps glibc's
defaults, under which every step maps and page-faults its large buffers anew (11-26% more time
per step in one back-to-back comparison; the ratios between candidates about the same).

Usage::

  python benchmarks/train_step.py                 # full run (several minutes)
  python benchmarks/train_step.py --quick         # smoke run: 1 layer, batch 1, few repeats
  python benchmarks/train_step.py --layers 4 --batch 4 --dtype float32 --repeats 9
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import itertools
import os
import platform
import signal
import statistics
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)
import boft_jax as boft  # noqa: E402
from _util import add_malloc_flag, memory_stats, paired_ratio, rotated, target_verdict  # noqa: E402

TARGETS = r"attention/(?:query|key|value|out)|mlp/(?:fc1|fc2)"


# ---------------------------------------------------------------------------------------------
# The model (ViT-B/16 encoder blocks, random weights)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int = 768
    mlp: int = 3072
    heads: int = 12
    layers: int = 4
    tokens: int = 197
    classes: int = 1000


class Attention(nn.Module):
    shape: Shape
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        s = self.shape
        dense = functools.partial(nn.Dense, s.hidden, dtype=self.dtype)
        heads = lambda t: t.reshape(*t.shape[:-1], s.heads, s.hidden // s.heads)  # noqa: E731
        q, k, v = (heads(dense(name=n)(x)) for n in ("query", "key", "value"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(s.hidden // s.heads).astype(q.dtype)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
        return dense(name="out")(out)


class MLP(nn.Module):
    shape: Shape
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.shape.mlp, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(self.shape.hidden, dtype=self.dtype, name="fc2")(h)


class Block(nn.Module):
    shape: Shape
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.shape, self.dtype, name="attention")(nn.LayerNorm(dtype=self.dtype)(x))
        return x + MLP(self.shape, self.dtype, name="mlp")(nn.LayerNorm(dtype=self.dtype)(x))


class ViT(nn.Module):
    shape: Shape
    dtype: Any = None

    @nn.compact
    def __call__(self, x):  # x: (batch, tokens, hidden) patch embeddings + CLS
        for i in range(self.shape.layers):
            x = Block(self.shape, self.dtype, name=f"layer_{i}")(x)
        x = nn.LayerNorm(dtype=self.dtype)(x)
        return nn.Dense(self.shape.classes, dtype=self.dtype, name="classifier")(x[:, 0])


_TARGET_CONFIG = boft.BOFTConfig(block_size=1, targets=TARGETS)  # only its path matching is used


class _Intercepting(nn.Module):
    """``model`` with every targeted ``nn.Dense`` call replaced by :meth:`adapted` (the baselines'
    own minimal interception; ``boft.wrap`` is the library's)."""

    model: nn.Module

    def setup(self):
        nn.share_scope(self, self.model)

    def adapted(self, mod: nn.Dense, x: jax.Array, dense: Callable[[], jax.Array]) -> jax.Array:
        """The targeted layer ``mod`` applied to ``x``; ``dense()`` runs the original layer."""
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        def intercept(next_fun, a, kw, context):
            mod = context.module
            if (
                context.method_name != "__call__"
                or not isinstance(mod, nn.Dense)
                or not _TARGET_CONFIG.matches("/".join(mod.path))
            ):
                return next_fun(*a, **kw)
            return self.adapted(mod, a[0], lambda: next_fun(*a, **kw))

        with nn.intercept_methods(intercept):
            return self.model(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Minimal LoRA through the same kind of interception
# ---------------------------------------------------------------------------------------------
@jax.custom_vjp
def _lora_branch(x, a, b):
    """``(x @ a) @ b`` for ``x (T, d_in)``; the backward pass orders its matmuls so that XLA:CPU never
    transposes ``x`` (autodiff's ``dA = x^T dh`` makes XLA copy ``x`` transposed, which costs more
    than the matmul itself; ``dA = (dh^T x)^T`` only transposes the thin ``dh`` and the result)."""
    return (x @ a) @ b


def _lora_fwd(x, a, b):
    h = x @ a
    return h @ b, (x, a, b, h)


def _lora_bwd(res, g):
    x, a, b, h = res
    dh = g @ b.T.astype(g.dtype)
    db = jax.lax.dot_general(h, g, (((0,), (0,)), ((), ())))
    da = jax.lax.dot_general(dh, x, (((0,), (0,)), ((), ()))).T
    return (dh @ a.T.astype(dh.dtype)).astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


_lora_branch.defvjp(_lora_fwd, _lora_bwd)


class LoRA(_Intercepting):
    """``model`` with LoRA on the targeted Dense layers: params ``lora_a (d_in, r)``, ``lora_b (r, d_out)``.

    ``tuned=False``: plain autodiff of ``(x @ A) @ B`` (how LoRA is usually written);
    ``tuned=True``: the same math with the hand-ordered backward pass of :func:`_lora_branch`.
    """

    rank: int = 8
    alpha: float = 16.0
    tuned: bool = False

    def adapted(self, mod, x, dense):
        y = dense()
        init_a = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
        lora_a = mod.param("lora_a", init_a, (x.shape[-1], self.rank), jnp.float32)
        # Non-zero B so the branch is a real computation (timing does not depend on values).
        lora_b = mod.param("lora_b", nn.initializers.normal(1e-3), (self.rank, mod.features), jnp.float32)
        x, lora_a, lora_b = nn.dtypes.promote_dtype(x, lora_a, lora_b, dtype=mod.dtype)
        if self.tuned:
            x2 = x.reshape(-1, x.shape[-1])
            return y + _lora_branch(x2, lora_a, lora_b).reshape(y.shape) * (self.alpha / self.rank)
        return y + (x @ lora_a) @ lora_b * (self.alpha / self.rank)


def _split_by_name(params, names):
    """(frozen, adapter) where adapter holds the leaves whose key is in ``names``."""

    def go(tree, want):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                sub = go(v, want)
                if sub:
                    out[k] = sub
            elif (k in names) == want:
                out[k] = v
        return out

    return go(params, False), go(params, True)


def _merge_trees(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge_trees(a[k], v) if k in a and isinstance(v, dict) else v
    return out


# ---------------------------------------------------------------------------------------------
# BOFT by plain autodiff of the public structured products (the linen path before issue 3)
# ---------------------------------------------------------------------------------------------
class AutodiffBOFT(_Intercepting):
    """``y = ((x M) K) * s + bias`` with ``boft.rotate`` / ``boft.rotate_kernel`` (``m`` permuted
    block-diagonal einsums) and ``boft.cayley``, differentiated by JAX: what ``boft.wrap`` computed
    before issue 3.  ``mode="weight"``: ``x @ ((M K) * s)``, whose autodiff pays ``x^T dy``."""

    block_size: int = 8
    n_factors: int = 1
    mode: str = "input"

    def adapted(self, mod, x, dense):
        b, m = self.block_size, self.n_factors
        d = x.shape[-1]
        kernel = mod.param("kernel", mod.kernel_init, (d, mod.features), mod.param_dtype)
        bias = mod.param("bias", mod.bias_init, (mod.features,), mod.param_dtype)
        skew = mod.param("boft_skew", nn.initializers.zeros, (m, d // b, b * (b - 1) // 2), jnp.float32)
        scale = mod.param("boft_s", nn.initializers.ones, (mod.features,), jnp.float32)
        blocks = boft.cayley(skew)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=mod.dtype)
        if self.mode == "weight":
            w = (boft.rotate_kernel(kernel, blocks) * scale).astype(kernel.dtype)
            return x @ w + bias
        return (boft.rotate(x, blocks) @ kernel) * scale.astype(x.dtype) + bias


# ---------------------------------------------------------------------------------------------
# Naive JAX port of PEFT's BOFT layer (dense permutations, dense block diagonals, dense M)
# ---------------------------------------------------------------------------------------------
class PEFTNaive(_Intercepting):
    """PEFT's ``boft`` Linear forward, ported op for op (see peft/tuners/boft/layer.py).

    Params per targeted layer: ``boft_R (m, k, b, b)`` (full matrices; the skew part is used) and
    ``boft_s (d_out,)``; buffers ``boft_P (m, d, d)`` in the ``"buffers"`` collection.
    """

    block_size: int = 8
    n_factors: int = 1

    def adapted(self, mod, x, dense):
        b, m = self.block_size, self.n_factors
        d = x.shape[-1]
        k = d // b
        kernel = mod.param("kernel", mod.kernel_init, (d, mod.features), mod.param_dtype)
        bias = mod.param("bias", mod.bias_init, (mod.features,), mod.param_dtype)
        R = mod.param("boft_R", nn.initializers.zeros, (m, k, b, b), jnp.float32)
        s = mod.param("boft_s", nn.initializers.ones, (mod.features,), jnp.float32)

        def perm_mats(_):
            perms = boft.butterfly_permutations(d, b, m)
            P = np.zeros((m, d, d), np.float32)
            for i, p in enumerate(perms):
                P[i, np.arange(d), p] = 1.0
            return jnp.asarray(P)

        P = mod.variable("buffers", "boft_P", perm_mats, None).value
        R = R.reshape(m * k, b, b)
        skew = 0.5 * (R - jnp.swapaxes(R, -1, -2))
        eye = jnp.eye(b, dtype=skew.dtype)
        # cayley_batch: PEFT calls torch.linalg.solve; jnp.linalg.solve's LAPACK custom calls
        # deadlock XLA:CPU in programs this size (see boft.solve_identity_plus_skew), so the
        # port uses the same solve as boft_jax (a negligible part of this candidate's time).
        Q = boft.solve_identity_plus_skew(skew, eye - skew)
        Q = Q.reshape(m, k, b, b)
        # torch.block_diag(*blocks) for each factor: (m, d, d)
        bd = jnp.einsum("mkce,kj->mkcje", Q, jnp.eye(k, dtype=Q.dtype)).reshape(m, d, d)
        mats = P @ bd @ jnp.swapaxes(P, -1, -2)  # boft_P @ block_diag @ boft_P^T (bmm x 2)
        M = mats[0]
        for i in range(1, m):
            M = mats[i] @ M
        # PEFT rotates the (in, out)-transposed weight, then scales its output rows.
        W = (M @ kernel.astype(jnp.float32)) * s
        x, W, bias_ = nn.dtypes.promote_dtype(x, W, bias, dtype=mod.dtype)
        return x @ W + bias_


# ---------------------------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Candidate:
    name: str
    step: Callable  # jitted; called as step(*state, *static_args) -> new state (+ loss)
    state: tuple  # donated leading args (adapter, opt_state)
    static: tuple  # frozen params, inputs, labels
    n_adapter: int
    repeats: int = 0
    times: list = dataclasses.field(default_factory=list)
    mem: dict = dataclasses.field(default_factory=dict)
    raw: Callable | None = None  # the un-jitted step (for profiling without donation)
    compiled: Any = None  # ``step.lower(...).compile()``, set by :func:`measure` (one compilation)

    def run(self):
        out = (self.compiled or self.step)(*self.state, *self.static)
        if self.state:
            self.state = out[:2]
        return out


def _loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


@contextlib.contextmanager
def matmul_forms():
    """While tracing: boft_jax's products of small blocks as (batched) matmuls only.

    boft_jax uses broadcast multiply-adds for blocks up to 16 wide (``_ops._EW_MAX_SPAN``,
    ``orthogonal._EW_MAX_BLOCK``) and 16-wide block gradients (``_ops._BLOCK_GRAD_MIN_SPAN``),
    choices measured on XLA:CPU.  ``--matmul-forms`` adds candidates traced without them, to
    compare on other backends (on an H200, m = 4, which uses the matmul forms at S = 64, was faster
    than m = 1 and m = 2).  Trace caches are cleared on entry and exit so that neither kind of
    candidate reuses the other's traced layers.
    """
    from boft_jax import _ops, orthogonal

    saved = (_ops._EW_MAX_SPAN, _ops._BLOCK_GRAD_MIN_SPAN, orthogonal._EW_MAX_BLOCK)
    jax.clear_caches()
    _ops._EW_MAX_SPAN, _ops._BLOCK_GRAD_MIN_SPAN, orthogonal._EW_MAX_BLOCK = 0, 1, 0
    try:
        yield
    finally:
        _ops._EW_MAX_SPAN, _ops._BLOCK_GRAD_MIN_SPAN, orthogonal._EW_MAX_BLOCK = saved
        jax.clear_caches()


def _train_candidate(
    name, apply_fn, frozen, adapter, extra_vars, x, labels, combine=None, trace_context=contextlib.nullcontext
) -> Candidate:
    opt = optax.adamw(1e-4)
    combine = combine or _merge_trees

    def step(adapter, opt_state, frozen, extra, x, labels):
        def loss_fn(adapter):
            params = combine(frozen, adapter)
            return _loss(apply_fn({"params": params, **extra}, x), labels)

        with trace_context():  # the whole step: custom VJPs' backward rules are traced here too
            loss, grads = jax.value_and_grad(loss_fn)(adapter)
        updates, opt_state = opt.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))
    n = sum(int(np.prod(l.shape)) for l in jax.tree.leaves(adapter))
    c = Candidate(name, jitted, (adapter, opt.init(adapter)), (frozen, extra_vars, x, labels), n)
    c.raw = step
    return c


def build(args) -> list[Candidate]:
    dtype = jnp.dtype(args.dtype)
    shape = Shape(layers=args.layers, tokens=args.tokens)
    base = ViT(shape, dtype=dtype)
    rng = jax.random.key(0)
    x = jax.random.normal(jax.random.key(1), (args.batch, shape.tokens, shape.hidden), jnp.float32).astype(dtype)
    labels = jax.random.randint(jax.random.key(2), (args.batch,), 0, shape.classes)
    base_params = jax.jit(base.init)(rng, x[:1])["params"]
    base_params = jax.tree.map(lambda a: a.astype(dtype), base_params)
    cands = []
    want = set(args.only.split(",")) if args.only else None

    def wanted(name):
        return want is None or any(name.startswith(w) for w in want)

    def from_shapes(model, split):
        """(frozen, adapter shapes): the frozen tree is ``base_params`` itself (checked to match the
        model's); the adapter's shapes come from ``jax.eval_shape`` of ``model.init``, so no
        candidate compiles or runs an init of the whole model (minutes on a GPU at 12 layers)."""
        frozen_s, adapter_s = split(jax.eval_shape(model.init, rng, x[:1])["params"])
        if jax.tree.structure(frozen_s) != jax.tree.structure(base_params):
            raise AssertionError(f"{type(model).__name__}: frozen params differ from the base model's")
        return base_params, adapter_s

    if wanted("frozen"):
        # The floor: forward + backward to the inputs, nothing trains, no optimizer.
        def frozen_step(params, x, labels):
            return jax.grad(lambda x: _loss(base.apply({"params": params}, x), labels))(x)

        cands.append(Candidate("frozen", jax.jit(frozen_step), (), (base_params, x, labels), 0))
        cands[-1].raw = frozen_step

    for tuned in (False, True):
        name = "lora r=8 tuned" if tuned else "lora r=8"
        if not wanted(name):
            continue
        model = LoRA(base, rank=8, tuned=tuned)
        frozen, adapter = from_shapes(model, lambda p: _split_by_name(p, {"lora_a", "lora_b"}))
        # Random A and B (values do not change the time); B non-zero so the branch is real.
        adapter = jax.tree.map(lambda a: 0.02 * jax.random.normal(jax.random.key(3), a.shape, a.dtype), adapter)
        cands.append(_train_candidate(name, model.apply, frozen, adapter, {}, x, labels))

    forms = [("", contextlib.nullcontext)] + ([(" mm", matmul_forms)] if args.matmul_forms else [])
    for m, mode, (suffix, ctx) in itertools.product(args.factors, args.modes, forms):
        name = f"boft m={m} {mode}{suffix}"
        if not wanted(name):
            continue
        cfg = boft.BOFTConfig(block_size=args.block_size, n_factors=m, targets=TARGETS, mode=mode)
        model = boft.wrap(base, cfg)
        frozen, adapter = from_shapes(model, lambda p: boft.split(p, cfg))
        # A non-identity adapter near the identity init (skew ~ 0, scale ~ 1); values do not
        # change the time, but keep it honest.
        adapter = jax.tree.map(
            lambda a: (a.ndim == 1) + 0.01 * jax.random.normal(jax.random.key(3), a.shape, a.dtype), adapter
        )
        cands.append(_train_candidate(
            name, model.apply, frozen, adapter, {}, x, labels, combine=boft.combine, trace_context=ctx
        ))

    for m in args.autodiff_factors:
        for mode in ("input", "weight"):
            name = f"autodiff m={m} {mode}"
            if not wanted(name):
                continue
            model = AutodiffBOFT(base, block_size=args.block_size, n_factors=m, mode=mode)
            params = jax.jit(model.init)(rng, x[:1])["params"]
            frozen, adapter = _split_by_name(params, {"boft_skew", "boft_s"})
            frozen = jax.tree.map(lambda a: a.astype(dtype), frozen)
            adapter = jax.tree.map(
                lambda a: a + 0.01 * jax.random.normal(jax.random.key(3), a.shape, a.dtype), adapter
            )
            cands.append(_train_candidate(name, model.apply, frozen, adapter, {}, x, labels))

    for m in args.peft_factors:
        name = f"peft m={m} naive"
        if not wanted(name):
            continue
        model = PEFTNaive(base, block_size=args.block_size, n_factors=m)
        variables = jax.jit(model.init)(rng, x[:1])
        frozen, adapter = _split_by_name(variables["params"], {"boft_R", "boft_s"})
        frozen = jax.tree.map(lambda a: a.astype(dtype), frozen)
        c = _train_candidate(name, model.apply, frozen, adapter, {"buffers": variables["buffers"]}, x, labels)
        c.repeats = getattr(args, "peft_repeats", 0)  # a timing option (main's), absent in peak_buffers
        cands.append(c)
    return cands


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
def _memory(c: Candidate) -> dict:
    """XLA's memory analysis of ``c``'s step (:class:`_util.MemoryStats`, as a dict); compiles it once
    and keeps the executable in ``c``.  "peak" leaves out the donated outputs (new adapter and
    optimizer state), which XLA writes into the argument buffers they replace; "footprint" adds the
    arguments (frozen weights and states)."""
    c.compiled = c.step.lower(*c.state, *c.static).compile()
    m = memory_stats(c.compiled)
    if m is None:
        return {}
    return {"temp": m.temp, "out": m.output, "args": m.argument, "alias": m.alias, "peak": m.peak, "footprint": m.footprint}


def measure(cands: list[Candidate], repeats: int, warmup: int = 2, log=print) -> None:
    """Compile + warm up every candidate, then time ``repeats`` interleaved rounds.

    Interrupted (Ctrl-C, or SIGTERM from ``timeout``, see :func:`main`) while compiling: the
    candidates not yet compiled are dropped from ``cands`` and at most 5 rounds of the others run.
    """
    ready = []
    try:
        for c in cands:
            t = time.perf_counter()
            c.mem = _memory(c)
            for _ in range(warmup):
                jax.block_until_ready(c.run())
            log(f"  compiled + warmed {c.name:18s} in {time.perf_counter() - t:6.1f} s")
            ready.append(c)
    except KeyboardInterrupt:
        log(f"# interrupted while compiling: timing the {len(ready)} compiled candidates only")
        cands[:] = ready
        repeats = min(repeats, 5)
    for r in range(repeats):
        # each round starts one candidate later, so no candidate always runs right after another
        # (e.g. after the slow naive PEFT port, or just after LoRA)
        for c in rotated(cands, r):
            if c.repeats and r >= c.repeats:
                continue
            t = time.perf_counter()
            jax.block_until_ready(c.run())
            c.times.append(time.perf_counter() - t)
        log(f"  repeat {r + 1}/{repeats} done")


# Issue 3's targets: BOFT step time (mode "auto") per m, and peak memory, relative to LoRA's.
TARGET_STEP = {1: 1.05, 2: 1.10, 4: 1.15}
TARGET_MEMORY = 1.10


def _references(cands: list[Candidate]) -> tuple[Candidate, int, int]:
    """The stricter LoRA: the faster variant for time, the smaller peak and footprint (bytes) for memory."""
    loras = [c for c in cands if c.name.startswith("lora")] or cands[:1]
    return (min(loras, key=lambda c: statistics.median(c.times)), min(c.mem.get("peak", 0) for c in loras),
            min(c.mem.get("footprint", 0) for c in loras))


def table(cands: list[Candidate]) -> str:
    ref, m_ref, f_ref = _references(cands)
    m_ref, f_ref = m_ref or 1, f_ref or 1
    t_ref = statistics.median(ref.times)
    tmin_ref = min(ref.times)
    rows = [
        "| variant | trainable | step ms (median) | vs LoRA | paired vs LoRA [90% CI] | min ms | vs LoRA (min) | n"
        " | peak MiB | vs LoRA | args MiB | args+peak MiB | vs LoRA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cands:
        t = statistics.median(c.times)
        tmin = min(c.times)
        peak = c.mem.get("peak", 0)
        pr = paired_ratio(c.times, ref.times) if c is not ref else None
        paired = f"{pr[0]:.3f}x [{pr[1]:.3f}, {pr[2]:.3f}]" if pr else "-"
        rows.append(
            f"| {c.name} | {c.n_adapter:,} | {t * 1e3:.1f} | {t / t_ref:.3f}x | {paired} | {tmin * 1e3:.1f} |"
            f" {tmin / tmin_ref:.3f}x | {len(c.times)} | {peak / 2**20:.1f} | {peak / m_ref:.3f}x |"
            f" {c.mem.get('args', 0) / 2**20:.1f} | {c.mem.get('footprint', 0) / 2**20:.1f} |"
            f" {c.mem.get('footprint', 0) / f_ref:.3f}x |"
        )
    return "\n".join(rows)


def verdicts(cands: list[Candidate]) -> list[str]:
    """One line per issue-3 target that this run measured ("boft m=1/2/4 auto" vs the stricter LoRA).

    Step time: *met* when the whole 90% interval of the paired ratio is at or under the target,
    *missed* when it is entirely above, *undecided* (within this machine's noise) otherwise.
    Memory (deterministic, no interval): the compiled peak vs the smaller LoRA peak.
    """
    if not any(c.name.startswith("lora") for c in cands):
        return ["no LoRA in this run: no verdicts (the targets are relative to LoRA)"]
    ref, m_ref, _ = _references(cands)
    by_name = {c.name: c for c in cands}
    out = []
    for m, target in TARGET_STEP.items():
        c = by_name.get(f"boft m={m} auto")
        if c is None:
            continue
        pr = paired_ratio(c.times, ref.times)
        if pr:
            out.append(
                f"step  m={m}: {pr[0]:.3f}x {ref.name} [90% CI {pr[1]:.3f}-{pr[2]:.3f}], target <= {target:.2f}x:"
                f" {target_verdict(pr, target)}"
            )
        if m_ref and c.mem.get("peak"):
            ratio = c.mem["peak"] / m_ref
            word = "met" if ratio <= TARGET_MEMORY else "missed"
            out.append(f"memory m={m}: {ratio:.3f}x the LoRA peak, target <= {TARGET_MEMORY:.2f}x: {word}")
    return out


def add_build_args(p: argparse.ArgumentParser, only_default: str = "") -> None:
    """Every option :func:`build` reads: the model, the adapters and which candidates to build
    (shared with ``peak_buffers.py``, which passes its own ``--only`` default)."""
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--modes", nargs="+", default=["input", "weight", "auto"])
    p.add_argument("--peft-factors", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument(
        "--autodiff-factors", type=int, nargs="*", default=[],
        help="also time plain autodiff of boft.rotate/rotate_kernel (the pre-issue-3 linen path) for these m",
    )
    p.add_argument(
        "--matmul-forms", action="store_true",
        help="also time each BOFT candidate traced with batched matmuls for every block size (name suffix ' mm')",
    )
    p.add_argument("--only", default=only_default, help="comma-separated candidate name prefixes, e.g. 'lora,boft m=1'")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 layer, batch 1, 3 repeats, m=1,2 (replaces --layers/--batch/--repeats; its"
                   " verdicts rest on 3 rounds, so they only show the script works)")
    add_build_args(p)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--peft-repeats", type=int, default=3, help="repeats for the (slow) naive PEFT port")
    add_malloc_flag(p)
    args = p.parse_args(argv)
    allocator = "host allocator: " + boft.host_memory.configure(args.system_malloc)
    if args.quick:
        args.layers, args.batch, args.repeats, args.peft_repeats = 1, 1, 3, 2
        args.factors = [f for f in args.factors if f <= 2]
        args.peft_factors = [f for f in args.peft_factors if f <= 2]

    print(
        f"# train_step: ViT-B/16 shapes, {args.layers} layers, batch {args.batch}, {args.tokens} tokens,"
        f" {args.dtype}, b = {args.block_size}; adapters on q, k, v, out, fc1, fc2"
    )
    print(
        f"# {datetime.date.today()}  jax {jax.__version__}  {platform.processor() or platform.machine()}"
        f"  {os.cpu_count()} cpus  devices {jax.devices()}"
    )
    print(f"# {allocator}")
    def _stop(signum, frame):  # `timeout` (SIGTERM): report the rounds measured so far
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    cands = []
    try:
        t0 = time.perf_counter()
        cands = build(args)
        print(f"  built {len(cands)} candidates in {time.perf_counter() - t0:.1f} s")
        measure(cands, args.repeats)
    except KeyboardInterrupt:
        print("# interrupted: the table holds the rounds completed so far")
    cands = [c for c in cands if c.times]
    if not cands:
        return
    print(table(cands))
    for line in verdicts(cands):
        print(line)


if __name__ == "__main__":
    main()
