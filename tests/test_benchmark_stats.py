"""The statistics the issue-3 benchmark prints its verdicts from (benchmarks/train_step.py)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import train_step as ts


def _cand(name, times, peak=100 * 2**20):
    c = ts.Candidate(name=name, step=None, state=(), static=(), n_adapter=1)
    c.times = list(times)
    c.mem = {"peak": peak}
    return c


def test_paired_ratio_is_the_median_of_per_round_ratios_with_a_bootstrap_interval():
    rng = np.random.default_rng(7)
    n = 25
    drift = np.exp(rng.normal(0, 0.3, n))  # the machine's load, shared by both in a round
    ref = 0.75 * drift * np.exp(rng.normal(0, 0.01, n))
    ours = 1.08 * ref * np.exp(rng.normal(0, 0.02, n))
    med, lo, hi = ts.paired_ratio(list(ours), list(ref))
    ratios = ours / ref
    assert med == pytest.approx(np.median(ratios), rel=1e-12)
    assert lo <= med <= hi
    # The interval is the spread of the median under resampling: within the observed ratios,
    # and much narrower than the ratio of separate medians would suggest under this drift.
    assert ratios.min() <= lo and hi <= ratios.max()
    assert hi - lo < 0.05
    # The planted 1.08 is recovered although the load moved both times by ~30% between rounds.
    assert abs(med - 1.08) < 0.02


def test_paired_ratio_pairs_the_first_rounds_and_needs_three():
    assert ts.paired_ratio([1.0, 2.0], [1.0, 1.0]) is None
    med, _, _ = ts.paired_ratio([2.0, 4.0, 6.0, 100.0], [1.0, 2.0, 3.0])  # the 4th round is unpaired
    assert med == pytest.approx(2.0)


@pytest.mark.parametrize(
    "factor, word",
    [(1.00, "met"), (1.30, "missed"), (None, "undecided")],
)
def test_verdicts_call_a_target_only_when_the_whole_interval_is_on_one_side(factor, word):
    rng = np.random.default_rng(3)
    ref = list(0.7 + 0.1 * rng.random(15))
    if factor is None:  # ratios spread evenly across the m = 1 target (1.05)
        ours = [r * f for r, f in zip(ref, np.linspace(0.95, 1.15, 15))]
    else:
        ours = [r * factor * (1 + 0.001 * i) for i, r in enumerate(ref)]
    cands = [
        _cand("frozen", [r * 0.8 for r in ref]),
        _cand("lora r=8", [r * 1.2 for r in ref], peak=120 * 2**20),
        _cand("lora r=8 tuned", ref),
        _cand("boft m=1 auto", ours, peak=105 * 2**20),
    ]
    lines = ts.verdicts(cands)
    step = [ln for ln in lines if ln.startswith("step  m=1")]
    assert len(step) == 1 and step[0].endswith(word), lines
    assert "lora r=8 tuned" in step[0]  # the faster LoRA is the reference
    # memory against the smaller LoRA peak (100 MiB): 1.05x <= 1.10x
    assert [ln for ln in lines if ln.startswith("memory m=1")] == [
        "memory m=1: 1.050x the LoRA peak, target <= 1.10x: met"
    ]


def test_collectives_counts_ops_and_result_bytes_in_hlo_text():
    """benchmarks/collectives.py: random collective lines (sync, sync with tuple results, async
    start/done pairs) among other instructions; expected counts and bytes are computed here from
    the drawn shapes."""
    from benchmarks import collectives as col

    rng = np.random.default_rng()
    itemsize = {"f32": 4, "bf16": 2, "s32": 4, "f64": 8}

    def array():
        dtype = str(rng.choice(list(itemsize)))
        dims = [int(v) for v in rng.integers(1, 9, size=rng.integers(0, 4))]
        text = f"{dtype}[{','.join(map(str, dims))}]{{{','.join(map(str, range(len(dims))))}}}"
        return text, int(np.prod(dims, dtype=np.int64)) * itemsize[dtype]

    lines, want = [], {}
    for i in range(60):
        op = str(rng.choice(col.COLLECTIVES))
        results = [array() for _ in range(rng.integers(1, 4))]
        # long tuples carry /*index=N*/ markers (an "=" inside the type)
        res_type = results[0][0] if len(results) == 1 else "(" + ", ".join(
            (f"/*index={j}*/" if j else "") + t for j, (t, _) in enumerate(results)) + ")"
        kind = rng.integers(3)
        if kind == 0:  # synchronous
            lines.append(f"  %{op}.{i} = {res_type} {op}(f32[8]{{0}} %p.{i}), replica_groups={{}}")
        elif op == "all-reduce":  # asynchronous all-reduce: the start returns the results
            lines.append(f"  %s.{i} = {res_type} {op}-start(f32[8]{{0}} %p.{i}), channel_id={i}")
            lines.append(f"  %d.{i} = {res_type} {op}-done({res_type} %s.{i})")
        else:  # asynchronous: an (operands, results) tuple at the start, counted once
            operands = ", ".join(f"f32[{j + 2}]{{0}}" for j in range(len(results)))
            start = f"({operands}, {', '.join(t for t, _ in results)})"
            lines.append(f"  %s.{i} = {start} {op}-start(f32[3]{{0}} %p.{i}), channel_id={i}")
            lines.append(f"  %d.{i} = {res_type} {op}-done({start} %s.{i})")
        lines.append(f"  %f.{i} = f32[5,5]{{1,0}} fusion(f32[5]{{0}} %x), calls=%fused.{i}")
        lines.append(f'  %g.{i} = f32[2]{{0}} add(%a, %b), metadata={{op_name="jit(f)/{op}(x)"}}')
        c, b = want.get(op, (0, 0))
        want[op] = (c + 1, b + sum(n for _, n in results))
    assert col.collectives("\n".join(lines)) == want


def test_rounds_rotate_the_order_of_the_candidates(monkeypatch):
    """No candidate always runs right after the same one (e.g. after the slow PEFT port)."""
    order = []
    cands = [ts.Candidate(name=n, step=lambda n=n: order.append(n) or 0.0, state=(), static=(), n_adapter=1)
             for n in "abc"]
    monkeypatch.setattr(ts, "_memory", lambda c: {})
    ts.measure(cands, repeats=4, warmup=0, log=lambda *a: None)
    assert ["".join(order[i:i + 3]) for i in range(0, 12, 3)] == ["abc", "bca", "cab", "abc"]
    assert all(len(c.times) == 4 for c in cands)


def test_memory_peak_leaves_out_donated_outputs_written_into_their_arguments():
    """A donated step's new state reuses its argument buffers: XLA counts it as output and alias."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(np.random.default_rng().standard_normal((256, 256)), jnp.float32)
    step = jax.jit(lambda a, b: (a * 2.0, jnp.tanh(a @ b)), donate_argnums=0)
    c = ts.Candidate(name="c", step=step, state=(x,), static=(x + 1,), n_adapter=1)
    mem = ts._memory(c)  # (XLA:CPU gives a memory analysis)
    assert mem["alias"] == x.nbytes and mem["args"] == 2 * x.nbytes
    assert mem["peak"] == mem["temp"] + mem["out"] - x.nbytes
    assert mem["footprint"] == mem["args"] + mem["peak"]


def test_shared_interleaved_timer_rotates_rounds_and_times_inner_calls(monkeypatch):
    """_util.interleaved_times (every benchmark's timer) rotates its rounds like train_step's, and
    ``inner`` back-to-back calls make one timing, in seconds per call."""
    from benchmarks import _util

    order, inners = [], []
    monkeypatch.setattr(_util, "compile_jitted", lambda f, *args: f)
    monkeypatch.setattr(_util, "_time_once", lambda g, args, inner=1: (order.append(g()), inners.append(inner), 1.0)[2])
    cands = [_util.Candidate(n, lambda n=n: n, ()) for n in "abc"]
    times = _util.interleaved_times(cands, repeats=4, warmup=0, inner=3)
    assert ["".join(order[i:i + 3]) for i in range(0, 12, 3)] == ["abc", "bca", "cab", "abc"]
    assert set(inners) == {3} and all(len(t) == 4 for t in times.values())
    assert _util.rotated([], 2) == []
    calls = []
    f = lambda: calls.append(1) or np.zeros(())  # noqa: E731
    monkeypatch.undo()
    assert _util._time_once(f, (), inner=5) >= 0 and len(calls) == 5


@pytest.mark.parametrize("b, d", [(8, 128), (4, 96)])
def test_two_level_probe_products_equal_the_dense_rotation(b, d):
    """benchmarks/two_level.py times m = 4 as two 2b-wide levels; its products must be x M, x M^T
    and M K of the butterfly's float64 dense M (fresh random rotations each run)."""
    from benchmarks import two_level

    seed = int(np.random.default_rng().integers(2**31))
    assert two_level.check(d, b=b, tokens=5, seed=seed) < 1e-5
