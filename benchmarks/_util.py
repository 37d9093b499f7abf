"""Shared helpers for the benchmarks: timing, memory, tables, machine description.

Timing rule for every benchmark here: compile first, warm up, then run candidates *interleaved*
(each repeat runs every candidate once, in turn) and report medians, so that noise on a shared
machine hits all candidates alike and ratios measured in one run stay meaningful.

Usage from a benchmark script (``benchmarks/`` is on ``sys.path`` when a script there is run)::

  from _util import Candidate, interleaved_medians, compiled_memory, markdown_table

  f = Candidate("rotate", jax.jit(boft.rotate), (x, blocks))
  g = Candidate("x @ M", jax.jit(jnp.matmul), (x, M))
  times = interleaved_medians([f, g], repeats=5)          # {"rotate": seconds, "x @ M": seconds}
  mem = compiled_memory(jax.jit(boft.rotate), x, blocks)  # MemoryStats(temp, output, ...)
  print(markdown_table(["name", "ms"], [[n, fmt_ms(t)] for n, t in times.items()]))

Set ``os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")`` at the top of a benchmark script, before
numpy/jax are imported (see ``rotate.py``): numpy's OpenBLAS threads otherwise spin and steal the
cores being timed on a busy 2-core machine.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import resource
import statistics
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

__all__ = [
    "Candidate",
    "MemoryStats",
    "compile_jitted",
    "compiled_memory",
    "fmt_mib",
    "fmt_ms",
    "fmt_ratio",
    "interleaved_medians",
    "interleaved_times",
    "load_average",
    "machine_description",
    "markdown_table",
    "median_time",
    "medians",
    "memory_stats",
    "paired_ratio",
    "peak_rss_bytes",
    "random_adapter",
    "rotated",
    "rss_bytes",
    "target_verdict",
]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def random_adapter(template, seed: int, scale: float = 0.1):
    """Random (non-identity) adapter values with ``template``'s structure (arrays or shape structs):
    ``scale``-sized numpy noise on every leaf, around 1 for the BOFT scales (``kernel/scale``)."""
    rng = np.random.default_rng(seed)

    def leaf(path, t):
        noise = scale * rng.standard_normal(np.shape(t)).astype(np.float32)
        names = [getattr(k, "key", None) for k in path[-2:]]
        return jax.numpy.asarray(1.0 + noise if names == ["kernel", "scale"] else noise)

    return jax.tree_util.tree_map_with_path(leaf, template)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def compile_jitted(f: Callable, *args) -> Callable:
    """Ahead-of-time compiled ``jax.jit(f)`` for these arguments (``f`` may already be jitted)."""
    jitted = f if hasattr(f, "lower") else jax.jit(f)
    return jitted.lower(*args).compile()


def _time_once(f: Callable, args: Sequence[Any], inner: int = 1) -> float:
    """Seconds per call of ``inner`` back-to-back calls (asynchronous dispatch overlaps them; one
    wait, on the last output, at the end): ``inner > 1`` for calls so short that a single call's
    dispatch and wake-up would be a visible part of it."""
    start = time.perf_counter()
    for _ in range(inner - 1):
        f(*args)
    jax.block_until_ready(f(*args))
    return (time.perf_counter() - start) / inner


def rotated(items: Sequence, r: int) -> list:
    """``items`` starting at position ``r`` (mod its length): round ``r``'s order, so that no
    candidate always runs right after the same one."""
    items = list(items)
    if not items:
        return []
    k = r % len(items)
    return items[k:] + items[:k]


def median_time(f: Callable, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time in seconds of ``f(*args)`` (jitted if it is not), after ``warmup`` calls.

    Every call is waited for with ``jax.block_until_ready``; compilation happens before the
    warm-up calls and is never timed.
    """
    g = compile_jitted(f, *args)
    for _ in range(warmup):
        jax.block_until_ready(g(*args))
    return statistics.median(_time_once(g, args) for _ in range(max(repeats, 1)))


@dataclasses.dataclass
class Candidate:
    """One thing to time: ``fn(*args)``.

    ``fn`` is jitted (unless it already is) and compiled ahead of time.  ``repeats`` overrides the
    common repeat count (e.g. ``1`` for a very slow baseline: it is then timed in the first round
    only, with ``warmup`` calls of its own, default none).
    """

    name: str
    fn: Callable
    args: tuple
    repeats: int | None = None
    warmup: int | None = None


def interleaved_times(
    candidates: Iterable[Candidate],
    repeats: int = 5,
    warmup: int = 1,
    compiled_out: dict | None = None,
    inner: int = 1,
) -> dict[str, list[float]]:
    """Seconds of every timed call per candidate, timed interleaved: round ``r`` runs every candidate
    once, in the candidates' order rotated by ``r`` (:func:`rotated`); ``inner`` back-to-back calls
    per timing (:func:`_time_once`).

    All candidates are compiled, then warmed up, before the first timed call.  A candidate with its
    own ``repeats`` takes part in that many rounds only (the first ones), so ``times[a][r]`` and
    ``times[b][r]`` ran back to back for every ``r`` both have (see :func:`paired_ratio`).  Pass a
    dict as ``compiled_out`` to get the compiled executables back (``name -> Compiled``), e.g. to
    check their outputs or read :func:`memory_stats` without compiling again.
    """
    cands = list(candidates)
    compiled = [compile_jitted(c.fn, *c.args) for c in cands]
    if compiled_out is not None:
        compiled_out.update({c.name: g for c, g in zip(cands, compiled)})
    for c, g in zip(cands, compiled):
        n_warm = warmup if c.warmup is None else c.warmup
        if c.repeats is not None and c.warmup is None:
            n_warm = 0  # a slow one-off baseline: its compilation is the warm-up
        for _ in range(n_warm):
            jax.block_until_ready(g(*c.args))
    times: dict[str, list[float]] = {c.name: [] for c in cands}
    rounds = max([repeats] + [c.repeats or 0 for c in cands])
    for r in range(rounds):
        for c, g in rotated(zip(cands, compiled), r):
            if r < (repeats if c.repeats is None else c.repeats):
                times[c.name].append(_time_once(g, c.args, inner))
    return {name: ts for name, ts in times.items() if ts}


def interleaved_medians(
    candidates: Iterable[Candidate],
    repeats: int = 5,
    warmup: int = 1,
    compiled_out: dict | None = None,
) -> dict[str, float]:
    """Median seconds per candidate of :func:`interleaved_times` (same arguments)."""
    return medians(interleaved_times(candidates, repeats, warmup, compiled_out))


def medians(times: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """``name -> median`` of ``name -> timed calls`` (e.g. from :func:`interleaved_times`)."""
    return {name: statistics.median(ts) for name, ts in times.items()}


def paired_ratio(
    times: Sequence[float], ref_times: Sequence[float], n_boot: int = 4000, seed: int = 0
) -> tuple[float, float, float] | None:
    """Median over rounds of ``times[r] / ref_times[r]`` and a 90% bootstrap interval of that median.

    Round ``r`` ran both candidates back to back (:func:`interleaved_times`), so the per-round
    ratio cancels the machine's slow drift (other jobs on a shared VM) that a ratio of separate
    medians carries.  The interval resamples rounds with replacement.  Returns ``(median, low,
    high)``; ``None`` with fewer than 3 paired rounds.
    """
    n = min(len(times), len(ref_times))
    if n < 3:
        return None
    r = np.asarray(times[:n], dtype=float) / np.asarray(ref_times[:n], dtype=float)
    rng = np.random.default_rng(seed)
    boot = np.median(r[rng.integers(0, n, size=(n_boot, n))], axis=1)
    return float(np.median(r)), float(np.quantile(boot, 0.05)), float(np.quantile(boot, 0.95))


def target_verdict(interval: tuple[float, float, float], target: float) -> str:
    """For a ratio that should be ``<= target``: "met" / "missed" when the whole interval of
    :func:`paired_ratio` is on one side of ``target``, else "undecided"."""
    _, lo, hi = interval
    return "met" if hi <= target else "missed" if lo > target else "undecided"


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MemoryStats:
    """XLA's compiled memory analysis of one function, in bytes."""

    temp: int
    output: int
    argument: int
    alias: int

    @property
    def peak(self) -> int:
        """What the call allocates beyond its arguments: temporaries + outputs, less the outputs
        written into donated argument buffers (aliased)."""
        return self.temp + self.output - self.alias

    @property
    def footprint(self) -> int:
        """Everything live during the call: its arguments (frozen weights, states) and :attr:`peak`."""
        return self.argument + self.peak


def compiled_memory(f: Callable, *args) -> MemoryStats | None:
    """``jax.jit(f).lower(*args).compile().memory_analysis()`` as :class:`MemoryStats`.

    ``None`` when the backend gives no analysis.
    """
    return memory_stats(compile_jitted(f, *args))


def memory_stats(compiled) -> MemoryStats | None:
    """:class:`MemoryStats` of an already compiled executable (``jax.jit(f).lower(...).compile()``)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return MemoryStats(
        temp=int(stats.temp_size_in_bytes),
        output=int(stats.output_size_in_bytes),
        argument=int(stats.argument_size_in_bytes),
        alias=int(stats.alias_size_in_bytes),
    )


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage``; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------
def fmt_ms(seconds: float | None, digits: int = 3) -> str:
    """Seconds as milliseconds with ``digits`` significant digits; ``-`` for ``None``."""
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.{digits}g}" if ms < 10 ** digits else f"{ms:.0f}"


def fmt_mib(nbytes: int | None) -> str:
    """Bytes as MiB (one decimal below 10 MiB); ``-`` for ``None``."""
    if nbytes is None:
        return "-"
    mib = nbytes / 2**20
    return f"{mib:.1f}" if mib < 10 else f"{mib:.0f}"


def fmt_ratio(x: float | None) -> str:
    """A ratio with 3 significant digits (``-`` for ``None``)."""
    if x is None:
        return "-"
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def markdown_table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None
) -> str:
    """A GitHub markdown table.  ``align``: one of ``l``/``r``/``c`` per column (default: first
    column left, the others right)."""
    rows = [[str(v) for v in row] for row in rows]
    n = len(headers)
    align = align or ("l" + "r" * (n - 1))
    widths = [max([len(str(h)), 3] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    rule = {
        "l": lambda w: ":" + "-" * (w - 1),
        "r": lambda w: "-" * (w - 1) + ":",
        "c": lambda w: ":" + "-" * (w - 2) + ":",
    }

    def line(cells):
        out = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)]
        return "| " + " | ".join(out) + " |"

    return "\n".join(
        [line([str(h) for h in headers]), "| " + " | ".join(rule[a](w) for a, w in zip(align, widths)) + " |"]
        + [line(r) for r in rows]
    )


def machine_description() -> str:
    """One line: date, CPU model and cores, RAM, jax version and default backend/devices."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for ln in fh:
                if ln.startswith("model name"):
                    cpu = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        ram_s = f", {ram:.0f} GiB RAM"
    except (ValueError, OSError):
        ram_s = ""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return (
        f"{datetime.date.today().isoformat()}; {cpu}, {os.cpu_count()} cores{ram_s};"
        f" jax {jax.__version__}, backend {jax.default_backend()} ({len(devices)} x {', '.join(kinds)})"
    )


def add_malloc_flag(ap) -> None:
    """``--system-malloc`` for a benchmark's argument parser; pass its value to
    ``boft_jax.host_memory.configure`` before JAX's first computation (before :func:`machine_description`)."""
    ap.add_argument(
        "--system-malloc", action="store_true",
        help="keep glibc's default allocator, which maps and unmaps every buffer above 32 MiB on each "
        "call (default: boft.keep_freed_memory() before JAX runs; see boft_jax/host_memory.py)",
    )


def load_average() -> str:
    """``os.getloadavg()`` formatted (the 1/5/15-minute load), or ``n/a``."""
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"

