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
    # BOFT keeps the pre-scale output of an adapted projection for the scale's gradient; LoRA keeps
    # only its rank-8 product there (0.0 MiB at one image)
    assert rows["fwd attention/query dot_general"].split("|")[3].strip().startswith("0.6 (1)")
    with pytest.raises(SystemExit, match="matched no candidate"):
        pb.main(["--only", "nothing", "--layers", "1"])
