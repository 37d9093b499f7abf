"""Experiment code behind ``butterfly_expressivity.ipynb`` (importable, so it can be tested).

Three experiments on the BOFT rotation ``M = F_{m-1} ... F_1 F_0`` (see boft_jax.butterfly):

1. **Sparsity / information flow** -- dense pictures of every factor ``F_i`` and of the cumulative
   products ``C_j = F_j ... F_0``, and the number of factors after which ``M`` is dense
   (every output depends on every input): ``1 + log2(d / b)``.
2. **Expressivity** -- fit a Haar-random ``d x d`` orthogonal matrix with ``BOFT(m, b)`` by
   gradient descent (Adam) on ``||M - Q||_F`` and compare the final error with the number of
   trainable skew parameters ``m (d / b) b (b - 1) / 2``.  For ``m = 1`` (block-diagonal OFT) the
   best possible error has a closed form (a polar decomposition per diagonal block), which tells us
   whether the optimizer converged.
3. **Cayley vs Cayley-Neumann** -- orthogonality error ``||Q^T Q - I||_F`` and run time of
   :func:`boft_jax.cayley` as the number of Neumann terms grows.

Everything here builds dense ``d x d`` matrices on purpose (through
:func:`boft_jax.rotation_matrix`); that is fine for pictures and a 512 x 512 fit, never for
training.

The environment variable ``BOFT_NOTEBOOK_SMALL=1`` selects a small configuration
(:data:`SMALL`) so that the whole notebook runs in seconds (used by ``tests/test_notebooks.py``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import boft_jax as boft

__all__ = [
    "SMALL",
    "Settings",
    "settings",
    "haar_orthogonal",
    "random_blocks",
    "factor_matrices",
    "cumulative_products",
    "structural_patterns",
    "factors_until_dense",
    "permutation_matrix",
    "num_params",
    "oft_optimal_error",
    "FitResult",
    "fit_boft",
    "NeumannResult",
    "neumann_study",
    "median_time",
]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


#: True when ``BOFT_NOTEBOOK_SMALL`` is set (to anything but ``0``/``false``/``no``/``off``).
SMALL: bool = _flag("BOFT_NOTEBOOK_SMALL")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of every experiment; :func:`settings` picks the full or the small one."""

    # 1. pictures
    pic_d: int
    pic_b: int
    # 2. expressivity fit
    d: int
    grid: tuple[tuple[int, int], ...]  # (m, b) pairs
    seeds: int
    steps: int
    lr: float
    claims: tuple[tuple[tuple[int, int], tuple[int, int]], ...]  # (fewer-params, more-params) pairs
    oft_gap_tolerance: float  # allowed (fit - optimum) / (||I - Q|| - optimum) for m = 1
    long_steps: int  # the longer-budget check of the claim configurations (first seed only)
    # 3. Cayley vs Neumann
    neumann_b: int
    neumann_blocks: int
    neumann_terms: tuple[int, ...]
    neumann_scales: tuple[float, ...]
    timing_reps: int


FULL_SETTINGS = Settings(
    pic_d=32,
    pic_b=4,
    d=512,
    grid=(
        (1, 2), (1, 4), (2, 4), (1, 8), (9, 2), (2, 8), (1, 16), (3, 8),
        (6, 4), (4, 8), (2, 16), (1, 32),
    ),
    seeds=3,
    steps=600,
    lr=0.05,
    # The paper's claims: BOFT(9,2) beats BOFT(1,16); BOFT(6,4) matches BOFT(2,16).
    claims=(((9, 2), (1, 16)), ((6, 4), (2, 16))),
    oft_gap_tolerance=0.02,
    long_steps=1500,
    neumann_b=16,
    neumann_blocks=512,
    neumann_terms=(1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16),
    neumann_scales=(0.003, 0.01, 0.03, 0.1, 0.25),
    timing_reps=30,
)

SMALL_SETTINGS = Settings(
    pic_d=32,
    pic_b=4,
    d=64,
    grid=((1, 16), (4, 4), (2, 16)),
    seeds=2,
    steps=100,
    lr=0.05,
    claims=(((4, 4), (1, 16)), ((4, 4), (2, 16))),  # the same comparisons, at d = 64
    oft_gap_tolerance=0.2,
    long_steps=150,
    neumann_b=8,
    neumann_blocks=64,
    neumann_terms=(1, 2, 3, 4, 8),
    neumann_scales=(0.01, 0.3),
    timing_reps=3,
)


def settings(small: bool | None = None) -> Settings:
    """The experiment sizes: small when ``small`` (default: :data:`SMALL`), full otherwise."""
    return SMALL_SETTINGS if (SMALL if small is None else small) else FULL_SETTINGS


# ---------------------------------------------------------------------------------------------
# Random matrices
# ---------------------------------------------------------------------------------------------
def haar_orthogonal(d: int, seed: int) -> np.ndarray:
    """A Haar-distributed ``d x d`` orthogonal matrix (float64).

    QR of a standard Gaussian matrix, then the sign correction ``Q <- Q diag(sign(diag(R)))``
    (without it the distribution of ``Q`` is not Haar; Mezzadri, 2007).  Its determinant is
    ``+1`` or ``-1`` with probability 1/2 each.
    """
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))[None, :]


def random_blocks(d: int, b: int, m: int, seed: int = 0, scale: float = 1.0) -> jax.Array:
    """``(m, d / b, b, b)`` Cayley blocks from Gaussian skew parameters (std ``scale``).

    With ``scale`` of order 1 every block is generically dense, so the nonzero pattern of any
    product of factors is its structural pattern.
    """
    params = scale * jax.random.normal(jax.random.key(seed), (m, d // b, boft.num_skew_params(b)))
    return boft.cayley(params, block_size=b)


# ---------------------------------------------------------------------------------------------
# 1. Sparsity patterns
# ---------------------------------------------------------------------------------------------
def _only(blocks: jax.Array, keep: Callable[[int], bool]) -> jax.Array:
    """The blocks with every factor ``i`` for which ``keep(i)`` is false replaced by identities."""
    m, k, b, _ = blocks.shape
    eye = jnp.broadcast_to(jnp.eye(b, dtype=blocks.dtype), (k, b, b))
    return jnp.stack([blocks[i] if keep(i) else eye for i in range(m)])


def factor_matrices(blocks: jax.Array) -> np.ndarray:
    """Dense ``(m, d, d)`` stack of the single factors ``F_i`` (the other factors set to ``I``).

    Built with :func:`boft_jax.rotation_matrix`, i.e. by the library's structured code.
    """
    m = blocks.shape[0]
    return np.stack([np.asarray(boft.rotation_matrix(_only(blocks, lambda j, i=i: j == i))) for i in range(m)])


def cumulative_products(blocks: jax.Array) -> np.ndarray:
    """Dense ``(m, d, d)`` stack of ``C_j = F_j ... F_1 F_0`` (``C_{m-1} = M``)."""
    m = blocks.shape[0]
    return np.stack([np.asarray(boft.rotation_matrix(_only(blocks, lambda i, j=j: i <= j))) for j in range(m)])


def permutation_matrix(perm: np.ndarray) -> np.ndarray:
    """``P[r, perm[r]] = 1`` (boft_jax.butterfly's convention)."""
    d = len(perm)
    p = np.zeros((d, d))
    p[np.arange(d), perm] = 1.0
    return p


def structural_patterns(d: int, b: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean nonzero patterns of the factors and of their cumulative products.

    Computed from the definition alone (``F_i = P_i blockdiag(full b x b) P_i^T`` with the
    permutations of :func:`boft_jax.butterfly_permutations`), with products of 0/1
    matrices (path counts), so no numerical cancellation can hide an entry.

    Returns:
      ``(factors, products)``, each ``(m, d, d)`` bool; ``products[j]`` is the pattern of
      ``F_j ... F_0``.
    """
    perms = boft.butterfly_permutations(d, b, m)
    # 0/1 matrices in float64: products count paths (at most d), exact, and use BLAS.
    block = np.kron(np.eye(d // b), np.ones((b, b)))
    factors, products = [], []
    acc = np.eye(d)
    for i in range(m):
        p = permutation_matrix(perms[i])
        f = (p @ block @ p.T) > 0
        acc = ((f.astype(np.float64) @ acc) > 0).astype(np.float64)
        factors.append(f)
        products.append(acc > 0)
    return np.stack(factors), np.stack(products)


def factors_until_dense(d: int, b: int) -> int | None:
    """Fewest factors ``j`` for which ``F_{j-1} ... F_0`` has no zero entry (``None``: never).

    Uses the largest valid ``m`` for ``(d, b)`` (:func:`boft_jax.max_factors`).
    """
    _, products = structural_patterns(d, b, boft.max_factors(d, b))
    for j, pattern in enumerate(products):
        if pattern.all():
            return j + 1
    return None


# ---------------------------------------------------------------------------------------------
# 2. Expressivity: fit a random orthogonal matrix
# ---------------------------------------------------------------------------------------------
def num_params(d: int, m: int, b: int) -> int:
    """Trainable skew parameters of ``BOFT(m, b)`` on ``d`` features: ``m (d/b) b(b-1)/2``.

    (A BOFT layer also trains ``d_out`` output scales; they play no part in fitting an orthogonal
    matrix and are not counted here.)
    """
    return m * (d // b) * boft.num_skew_params(b)


def oft_optimal_error(target: np.ndarray, b: int) -> float:
    """Smallest ``||M - Q||_F`` over block-diagonal ``M`` with ``b x b`` blocks in ``SO(b)``.

    ``||M - Q||_F^2 = 2 d - 2 sum_j tr(R_j^T Q_jj)`` for orthogonal ``M``, and
    ``max_{R in SO(b)} tr(R^T A)`` is the sum of the singular values of ``A`` with the smallest one
    negated when ``det(U V^T) = -1`` (the SO(b) polar factor).  This is BOFT(1, b)'s optimum; the
    Cayley map reaches every rotation without eigenvalue ``-1``, so its infimum is the same.
    """
    d = target.shape[0]
    total = 0.0
    for j in range(d // b):
        a = target[j * b : (j + 1) * b, j * b : (j + 1) * b]
        u, s, vt = np.linalg.svd(a)
        if np.linalg.det(u @ vt) < 0:
            s = s.copy()
            s[-1] = -s[-1]
        total += s.sum()
    return float(np.sqrt(max(2 * d - 2 * total, 0.0)))


@dataclasses.dataclass
class FitResult:
    """One ``BOFT(m, b)`` fit, over several targets (seeds)."""

    m: int
    b: int
    d: int
    params: int
    errors: np.ndarray  # (seeds,) final ||M - Q||_F
    curves: np.ndarray  # (seeds, steps) ||M - Q||_F after each step: curves[:, -1] == errors
    orthogonality: float  # max over seeds of ||M^T M - I||_F of the fitted M
    oft_optimum: np.ndarray | None  # (seeds,) closed-form optimum when m == 1, else None
    seconds: float  # wall time of the fit, compile included

    @property
    def label(self) -> str:
        return f"BOFT({self.m},{self.b})"

    @property
    def mean(self) -> float:
        return float(self.errors.mean())

    @property
    def std(self) -> float:
        return float(self.errors.std())


def _fit_fn(d: int, m: int, b: int, steps: int, lr: float):
    k, n = d // b, boft.num_skew_params(b)
    schedule = optax.cosine_decay_schedule(lr, steps, alpha=0.01)
    opt = optax.adam(schedule)

    def error_sq(params, target):
        rot = boft.rotation_matrix(boft.cayley(params, block_size=b))
        return jnp.sum((rot - target) ** 2), rot

    grad_fn = jax.value_and_grad(error_sq, has_aux=True)

    def run(target):
        params = jnp.zeros((m, k, n), jnp.float32)  # M = I, as BOFT starts

        def step(carry, _):
            params, state = carry
            (loss, _), g = grad_fn(params, target)
            updates, state = opt.update(g, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
        loss, rot = error_sq(params, target)
        ortho = jnp.linalg.norm(jnp.matmul(rot.T, rot, precision=jax.lax.Precision.HIGHEST) - jnp.eye(d))
        # losses[j] is the error before update j + 1; the curve holds the error after updates 1 .. steps
        after = jnp.concatenate([losses[1:], loss[None]])
        return jnp.sqrt(loss), jnp.sqrt(jnp.maximum(after, 0.0)), ortho

    return jax.jit(jax.vmap(run))


def fit_boft(
    targets: np.ndarray,
    m: int,
    b: int,
    *,
    steps: int,
    lr: float,
) -> FitResult:
    """Fit ``BOFT(m, b)`` to each of the ``(seeds, d, d)`` orthogonal ``targets`` with Adam.

    Loss ``||M - Q||_F^2`` (same minimizer as ``||M - Q||_F``, smoother), parameters start at
    zero (``M = I``), learning rate ``lr`` with cosine decay to ``lr / 100`` over ``steps``; all
    seeds run in one jitted, vmapped ``lax.scan``.
    """
    seeds, d, _ = targets.shape
    t0 = time.perf_counter()
    final, curves, ortho = _fit_fn(d, m, b, steps, lr)(jnp.asarray(targets, jnp.float32))
    final = np.asarray(jax.block_until_ready(final), np.float64)
    seconds = time.perf_counter() - t0
    opt = np.array([oft_optimal_error(t, b) for t in targets]) if m == 1 else None
    return FitResult(
        m=m,
        b=b,
        d=d,
        params=num_params(d, m, b),
        errors=final,
        curves=np.asarray(curves, np.float64),
        orthogonality=float(np.max(ortho)),
        oft_optimum=opt,
        seconds=seconds,
    )


# ---------------------------------------------------------------------------------------------
# 3. Cayley vs Cayley-Neumann
# ---------------------------------------------------------------------------------------------
def median_time(fn: Callable, *args, reps: int = 20, warmup: bool = True) -> float:
    """Median wall time (seconds) of ``fn(*args)``, after one warm-up (compile) call."""
    if warmup:
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _ortho_error(q: jax.Array) -> jax.Array:
    """Per-block ``||Q^T Q - I||_F``."""
    b = q.shape[-1]
    qtq = jnp.einsum("...ji,...jk->...ik", q, q, precision=jax.lax.Precision.HIGHEST)
    return jnp.linalg.norm(qtq - jnp.eye(b, dtype=q.dtype), axis=(-2, -1))


@dataclasses.dataclass
class NeumannResult:
    """Orthogonality error and timings of the Cayley map for one skew-parameter scale."""

    scale: float  # std of the packed skew parameters
    spectral_norm: float  # median over blocks of ||S||_2
    terms: tuple[int, ...]
    ortho: np.ndarray  # (len(terms),) median over blocks of ||Q^T Q - I||_F, Neumann
    dist: np.ndarray  # (len(terms),) median over blocks of ||Q_neumann - Q_exact||_F
    ortho_exact: float  # the same for the exact Cayley map
    time_fwd: np.ndarray  # (len(terms),) median seconds, forward
    time_grad: np.ndarray  # (len(terms),) median seconds, value and gradient of a scalar
    time_fwd_exact: float
    time_grad_exact: float
    time_fwd_min: np.ndarray  # fastest round instead of the median (less sensitive to load)
    time_grad_min: np.ndarray
    time_fwd_exact_min: float
    time_grad_exact_min: float


def neumann_study(
    b: int,
    n_blocks: int,
    terms: Sequence[int],
    scales: Sequence[float],
    *,
    reps: int = 20,
    seed: int = 0,
) -> list[NeumannResult]:
    """Exact Cayley vs Neumann with ``n`` terms, for ``n_blocks`` random ``b x b`` blocks per scale.

    Timings are measured once, at parameter scale 0.01 (the cost does not depend on the values),
    as medians over ``reps`` interleaved rounds.
    """
    n = boft.num_skew_params(b)
    base = jax.random.normal(jax.random.key(seed), (n_blocks, n), jnp.float32)
    probe = jax.random.normal(jax.random.key(seed + 1), (n_blocks, b, b), jnp.float32)

    def make(method: str, nt: int):
        def fwd(p):
            return boft.cayley(p, block_size=b, method=method, neumann_terms=nt)

        def scalar(p):
            return jnp.sum(fwd(p) * probe)

        return jax.jit(fwd), jax.jit(jax.value_and_grad(scalar))

    # Interleaved rounds (every variant once per round), so that load from other processes
    # spreads evenly over the variants; then the median over rounds.
    variants = {key: (make("exact", 1) if key == "exact" else make("neumann", int(key))) for key in ["exact", *terms]}
    x = 0.01 * base
    for fwd, grad in variants.values():  # compile
        jax.block_until_ready(fwd(x))
        jax.block_until_ready(grad(x))
    samples: dict[object, list[tuple[float, float]]] = {key: [] for key in variants}
    for _ in range(reps):
        for key, (fwd, grad) in variants.items():
            samples[key].append((median_time(fwd, x, reps=1, warmup=False), median_time(grad, x, reps=1, warmup=False)))
    timings = {key: tuple(np.median(np.array(v), axis=0)) for key, v in samples.items()}
    fastest = {key: tuple(np.min(np.array(v), axis=0)) for key, v in samples.items()}

    out = []
    for scale in scales:
        p = scale * base
        s = boft.unpack_skew(p, b)
        spec = float(np.median(np.linalg.norm(np.asarray(s, np.float64), ord=2, axis=(-2, -1))))
        q_exact = boft.cayley(p, block_size=b)
        ortho, dist = [], []
        for nt in terms:
            q = boft.cayley(p, block_size=b, method="neumann", neumann_terms=nt)
            ortho.append(float(jnp.median(_ortho_error(q))))
            dist.append(float(jnp.median(jnp.linalg.norm(q - q_exact, axis=(-2, -1)))))
        out.append(
            NeumannResult(
                scale=float(scale),
                spectral_norm=spec,
                terms=tuple(int(t) for t in terms),
                ortho=np.array(ortho),
                dist=np.array(dist),
                ortho_exact=float(jnp.median(_ortho_error(q_exact))),
                time_fwd=np.array([timings[t][0] for t in terms]),
                time_grad=np.array([timings[t][1] for t in terms]),
                time_fwd_exact=timings["exact"][0],
                time_grad_exact=timings["exact"][1],
                time_fwd_min=np.array([fastest[t][0] for t in terms]),
                time_grad_min=np.array([fastest[t][1] for t in terms]),
                time_fwd_exact_min=fastest["exact"][0],
                time_grad_exact_min=fastest["exact"][1],
            )
        )
    return out


def summary_table(results: Sequence[FitResult]) -> str:
    """A plain-text table of the fits, sorted by parameter count."""
    rows = [
        f"{'config':>11} {'params':>7} {'error mean':>11} {'std':>6} {'rel. error':>10}"
        f" {'OFT optimum':>11} {'time s':>7}"
    ]
    for r in sorted(results, key=lambda r: (r.params, r.m)):
        opt = f"{r.oft_optimum.mean():11.3f}" if r.oft_optimum is not None else f"{'':>11}"
        rows.append(
            f"{r.label:>11} {r.params:7d} {r.mean:11.3f} {r.std:6.3f}"
            f" {r.mean / math.sqrt(2 * r.d):10.4f} {opt} {r.seconds:7.1f}"
        )
    return "\n".join(rows)
