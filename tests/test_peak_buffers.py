"""The live-buffer analysis behind the memory verdict of issue 3 (benchmarks/peak_buffers.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import peak_buffers as pb

# A scheduled entry computation written by hand: a (1 MiB) and b (2 MiB) are live together while
# c (4 MiB) is made; b dies there; d (0.5 MiB) reads a and c; the root tuple outputs d.
_HLO = """HloModule m, is_scheduled=true

%fused (p: f32[262144]) -> f32[262144] {
  %p = f32[262144]{0} parameter(0)
  ROOT %n = f32[262144]{0} negate(%p)
}

ENTRY %main (x: f32[262144]) -> (f32[131072]) {
  %x = f32[262144]{0} parameter(0)
  %a = f32[262144]{0} fusion(%x), kind=kLoop, calls=%fused, metadata={op_name="jit(step)/jvp(M)/model/layer_0/mlp/fc1/dot_general"}
  %b = f32[524288]{0} fusion(%a), kind=kLoop, calls=%fused, metadata={op_name="jit(step)/jvp(M)/model/layer_1/mlp/fc1/dot_general"}
  %a.view = f32[512,512]{1,0} bitcast(%a)
  %c = f32[1048576]{0} fusion(%b, %a.view), kind=kLoop, calls=%fused, metadata={op_name="jit(step)/transpose(jvp(M))/model/layer_0/attention/query/transpose"}
  %d = f32[131072]{0} fusion(%a.view, %c), kind=kLoop, calls=%fused
  ROOT %out = (f32[131072]{0}) tuple(%d)
}
"""


def test_peak_of_a_hand_written_schedule():
    mib = 2**20
    bufs, n = pb.buffers(_HLO)
    assert n == 7
    ranges = {b.name: (b.start, b.end, b.bytes) for b in bufs}
    # x is an argument, a.view and out alias their operands: none is a buffer of its own
    assert ranges == {"a": (1, 5, mib), "b": (2, 4, 2 * mib), "c": (4, 5, 4 * mib), "d": (5, 6, mib // 2)}
    p = pb.peak(_HLO)
    # at c's instruction: a + b + c = 7 MiB; at d's: a + c + d = 5.5 MiB
    assert (p.bytes, p.position) == (7 * mib, 4)
    assert [b.name for b in p.live] == ["c", "b", "a"]
    assert pb.grouped(p) == {
        "bwd attention/query transpose": (4 * mib, 1),
        "fwd mlp/fc1 dot_general": (3 * mib, 2),  # layer_0 and layer_1 merged
    }


def test_shape_bytes():
    assert pb.shape_bytes("f32[788,768]{1,0}") == 788 * 768 * 4
    assert pb.shape_bytes("(bf16[4,8]{1,0}, s32[], pred[3])") == 64 + 4 + 3
    assert pb.shape_bytes("f32[]") == 4
    assert pb.shape_bytes("f8e4m3fn[10]") == 10 and pb.shape_bytes("s4[3]") == 2
    assert pb.tuple_elements("(f32[2]{0}, (s32[], bf16[3,4]{1,0}))") == ["f32[2]{0}", "(s32[], bf16[3,4]{1,0})"]
    with pytest.raises(ValueError, match="unknown element type 'q7'"):
        pb.shape_bytes("q7[4]")
    with pytest.raises(ValueError, match="dynamic shapes"):
        pb.shape_bytes("f32[<=8]")


def test_estimate_tracks_xla_on_a_compiled_gradient():
    """On a real compiled program the schedule estimate is close to XLA's own temp + output."""

    def loss(w1, w2, x):
        h = jnp.tanh(x @ w1)
        return jnp.sum(jnp.tanh(h @ w2) * x) + jnp.sum(jnp.tanh((2 * x) @ w1) @ w2)

    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((384, 512), (512, 384), (256, 384))]
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    ma = compiled.memory_analysis()
    xla = ma.temp_size_in_bytes + ma.output_size_in_bytes
    p = pb.peak(compiled.as_text())
    assert 0.85 * xla <= p.bytes <= 1.15 * xla, (p.bytes, xla)
    # the two weight gradients are the program's outputs: their buffers live to the last instruction
    bufs, n = pb.buffers(compiled.as_text())
    outputs = sorted(b.shape for b in bufs if b.end == n - 1 and b.shape.startswith("f32[") and "," in b.shape)
    assert outputs == ["f32[384,512]", "f32[512,384]"], outputs


def test_bad_text_is_refused():
    with pytest.raises(ValueError, match="no ENTRY computation"):
        pb.peak("not hlo")
    with pytest.raises(ValueError, match="found no instructions"):
        pb.peak("ENTRY %main () -> f32[] {\n}\n")


def test_script_on_a_one_layer_model(capsys):
    pb.main(["--only", "lora r=8 tuned,boft m=1 auto", "--layers", "1", "--batch", "1", "--factors", "1",
             "--modes", "auto", "--top", "40"])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for name in ("lora r=8 tuned", "boft m=1 auto"):
        est, xla = (float(v) for v in rows[name].split("|")[2:4])
        assert 0.85 * xla <= est <= 1.15 * xla, (name, est, xla)
    # BOFT keeps the pre-scale output of an adapted projection (197 x 768 floats = 0.58 MiB) for the
    # scale's gradient; LoRA keeps only its rank-8 product there
    lora_q, boft_q = (float(v.split("(")[0]) if v.strip() != "-" else 0.0
                      for v in rows["fwd attention/query dot_general"].split("|")[2:4])
    assert boft_q >= 0.5 > lora_q
    with pytest.raises(SystemExit, match="matched no candidate"):
        pb.main(["--only", "nothing", "--layers", "1"])


_MIB = 262144  # f32 elements in 1 MiB


def _module(*body: str) -> str:
    return "HloModule t, is_scheduled=true\n\nENTRY %main (x: f32[16]) -> f32[16] {\n" + "\n".join(
        "  " + line for line in body) + "\n}\n"


def test_while_loops_and_tuple_elements_share_or_split_buffers():
    # the loop runs in place on its state: a is not counted twice
    loop = _module(
        "%x = f32[16]{0} parameter(0)",
        f"%a = f32[{4 * _MIB}]{{0}} fusion(%x), kind=kLoop, calls=%f",
        f"%t = (f32[{4 * _MIB}]{{0}}) tuple(%a)",
        f"%w = (f32[{4 * _MIB}]{{0}}) while(%t), condition=%c, body=%b",
        f"%g = f32[{4 * _MIB}]{{0}} get-tuple-element(%w), index=0",
        "ROOT %r = f32[16]{0} fusion(%g), kind=kLoop, calls=%f",
    )
    bufs, _ = pb.buffers(loop)
    assert {b.name: (b.start, b.end) for b in bufs} == {"a": (1, 5), "r": (5, 5)}
    assert pb.peak(loop).bytes == 4 * 2**20 + 64
    # a multi-output fusion makes one buffer per output, each live until its own last use
    multi = _module(
        "%x = f32[16]{0} parameter(0)",
        f"%f = (f32[{_MIB}]{{0}}, f32[{2 * _MIB}]{{0}}) fusion(%x), kind=kLoop, calls=%f2",
        f"%g0 = f32[{_MIB}]{{0}} get-tuple-element(%f), index=0",
        f"%g1 = f32[{2 * _MIB}]{{0}} get-tuple-element(%f), index=1",
        f"%h = f32[{4 * _MIB}]{{0}} fusion(%g1), kind=kLoop, calls=%f",
        "ROOT %k = f32[16]{0} fusion(%g0, %h), kind=kLoop, calls=%f",
    )
    ranges = {b.name: (b.start, b.end, b.bytes // 2**20) for b in pb.buffers(multi)[0] if b.bytes >= 2**20}
    assert ranges == {"f#0": (1, 5, 1), "f#1": (1, 4, 2), "h": (4, 5, 4)}
    assert pb.peak(multi).bytes == 7 * 2**20
    # an asynchronous copy: the destination is new, the source is its operand's buffer
    copy = _module(
        "%x = f32[16]{0} parameter(0)",
        f"%a = f32[{_MIB}]{{0}} fusion(%x), kind=kLoop, calls=%f",
        f"%cs = (f32[{_MIB}]{{0}}, f32[{_MIB}]{{0}}, u32[]) copy-start(%a)",
        f"%cd = f32[{_MIB}]{{0}} copy-done(%cs)",
        "ROOT %r = f32[16]{0} fusion(%cd), kind=kLoop, calls=%f",
    )
    ranges = {b.name: (b.start, b.end) for b in pb.buffers(copy)[0]}
    assert ranges == {"a": (1, 3), "cs#0": (2, 4), "cs#2": (2, 3), "r": (4, 4)}


def test_estimate_matches_xla_for_a_loop():
    def f(x):
        return jax.lax.fori_loop(0, 3, lambda i, c: jnp.sin(c) * 2.0, x * 3.0)

    compiled = jax.jit(f).lower(jnp.ones((1024, 1024), jnp.float32)).compile()
    ma = compiled.memory_analysis()
    xla = ma.temp_size_in_bytes + ma.output_size_in_bytes
    assert 0.9 * xla <= pb.peak(compiled.as_text()).bytes <= 1.1 * xla
