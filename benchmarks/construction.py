"""Issue 3: what building the rotations costs per train step, apart from the token products.

Every adapted layer builds its rotation from the packed skew parameters on every call, forward and
backward, whatever the batch size: the Cayley map of its ``m k`` blocks (``boft.cayley``), then,
for ``m <= 4``, the ``(d/S, S, S)`` diagonal blocks of ``M`` (``boft_jax._ops.rotation_operand``).
This script times that construction alone (forward + backward, a random cotangent) for the layer
shapes of ``benchmarks/train_step.py`` (ViT-B: query/key/value/out and fc1 read 768 features, fc2
reads 3072) and sums it over the adapted layers of one step.  Compare the sums with the step times
of ``train_step.py``: on a CPU at batch 4 they are a visible share of a step; they do not grow with
the batch, so on an accelerator at batch 256 they are noise.

Candidates, for each m (b = 8 unless ``--block-size``) and d_in:

  cayley       grad of <cayley(skew), C> w.r.t. skew (the exact Cayley map and its closed-form VJP)
  cayley+span  the same for ``rotation_operand(cayley(skew))``: what a layer call builds

Usage::

  python benchmarks/construction.py                   # m = 1, 2, 4; 4 blocks of 6 layers
  python benchmarks/construction.py --factors 4 --repeats 31
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
from _util import Candidate, interleaved_medians, machine_description, markdown_table  # noqa: E402
from train_step import Shape  # noqa: E402

# (d_in, adapted layers of that width per transformer block) in train_step.py's model: query, key,
# value, out and fc1 read the hidden size, fc2 reads the MLP width
LAYER_WIDTHS = ((Shape.hidden, 5), (Shape.mlp, 1))


def _grad_of(build):
    def loss(skew, cot):
        return jnp.vdot(build(skew), cot)

    return jax.jit(jax.grad(loss))


def candidates(d: int, m: int, b: int, rng: np.random.Generator) -> list[Candidate]:
    skew = jnp.asarray(0.1 * rng.standard_normal((m, d // b, boft.num_skew_params(b))), jnp.float32)
    blocks = boft.cayley(skew)
    operand = _ops.rotation_operand(blocks)
    cot_blocks = jnp.asarray(rng.standard_normal(blocks.shape), jnp.float32)
    cot_operand = jnp.asarray(rng.standard_normal(operand.shape), jnp.float32)
    return [
        Candidate(f"cayley d={d} m={m}", _grad_of(boft.cayley), (skew, cot_blocks)),
        Candidate(
            f"cayley+span d={d} m={m}",
            _grad_of(lambda s: _ops.rotation_operand(boft.cayley(s))),
            (skew, cot_operand),
        ),
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--layers", type=int, default=Shape.layers, help="transformer blocks (6 adapted layers each)")
    p.add_argument("--repeats", type=int, default=21)
    args = p.parse_args(argv)
    print(f"# construction: {machine_description()}")
    rng = np.random.default_rng(0)
    cands = [c for m in args.factors for d, _ in LAYER_WIDTHS for c in candidates(d, m, args.block_size, rng)]
    times = interleaved_medians(cands, repeats=args.repeats)
    rows = []
    for m in args.factors:
        per_step = {"cayley": 0.0, "cayley+span": 0.0}
        cells = []
        for d, n in LAYER_WIDTHS:
            for what in per_step:
                t = times[f"{what} d={d} m={m}"]
                per_step[what] += args.layers * n * t
                cells.append(f"{t * 1e3:.3f}")
        rows.append([str(m), *cells, f"{per_step['cayley'] * 1e3:.1f}", f"{per_step['cayley+span'] * 1e3:.1f}"])
    header = ["m"]
    for d, _ in LAYER_WIDTHS:
        header += [f"cayley ms, d={d}", f"cayley+span ms, d={d}"]
    n_layers = args.layers * sum(n for _, n in LAYER_WIDTHS)
    header += [f"cayley ms / step ({n_layers} layers)", "cayley+span ms / step"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
