"""XLA compile time of a BOFT training gradient, unrolled layers vs ``scan_layers=True``.

Every adapted layer inlines its own adapter math (Cayley elimination, span build, structured
backward pass) into the compiled program, so an unrolled model pays XLA's compile time once per
layer; a model whose layers are under ``nn.scan`` (``boft_jax.models.vit`` / ``.t5`` with
``scan_layers=True``) compiles the layer body once.  This script measures both, next to the bare
model's gradient:

  base     ``jax.grad`` of the bare ViT's loss w.r.t. the input images (no adapter)
  boft     ``jax.grad`` of the wrapped ViT's loss w.r.t. the adapter (BOFT on every linear layer)

for a ViT-B/16-shaped model (hidden 768, MLP 3072, 12 heads, 224 x 224 images), ``--layers``
encoder layers, or with ``--model digits`` the bundled ViT of the main job (``train/assets``,
hidden 96, 4 layers; ``--targets attention --block-size 4`` is the job's default adapter).
``--dropout P`` takes the BOFT gradient in training mode with adapter dropout ``P`` (each adapted
layer then draws its own dropout mask).  Times: ``jit(...).lower`` (tracing) and ``.compile()``
(XLA), one process, in order.

Usage::

  python benchmarks/compile_time.py                   # 12 layers, m = 2, b = 8, batch 2
  python benchmarks/compile_time.py --layers 24 --n-factors 4
  python benchmarks/compile_time.py --model digits --targets attention --block-size 4 --batch 64 --dropout 0.25
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import boft_jax as boft  # noqa: E402
from boft_jax.models import vit  # noqa: E402
from _util import machine_description, markdown_table  # noqa: E402


def _loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def timed_compile(f, *args) -> tuple[float, float]:
    """Seconds to lower (trace) and to compile ``jax.jit(f)`` for ``args``."""
    t0 = time.perf_counter()
    lowered = jax.jit(f).lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="encoder layers of the ViT-B/16 shapes (default 12)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--n-factors", type=int, default=2)
    ap.add_argument("--model", choices=["vit-b", "digits"], default="vit-b",
                    help="ViT-B/16 shapes (default) or the main job's bundled ViT (its own 4 layers)")
    ap.add_argument("--targets", choices=sorted(vit.TARGET_PRESETS), default="all_linear")
    ap.add_argument("--dropout", type=float, default=0.0, help="adapter dropout; > 0: the gradient of a training step")
    args = ap.parse_args(argv)
    if args.model == "digits" and args.layers is not None:
        ap.error(f"--layers {args.layers}: only for --model vit-b; the digits ViT has its own 4 layers")
    if args.model == "digits":
        from train import make_base

        vcfg = vit.from_pretrained(make_base.VIT_BASE)[0].config
    else:
        vcfg = vit.ViTConfig(
            hidden_size=768, num_hidden_layers=args.layers or 12, num_attention_heads=12, intermediate_size=3072,
            image_size=224, patch_size=16, num_labels=10,
        )
    print(f"# compile_time: {args.model} (hidden {vcfg.hidden_size}, {vcfg.num_hidden_layers} layers), batch"
          f" {args.batch}, BOFT m = {args.n_factors}, b = {args.block_size} on {args.targets}, dropout {args.dropout}")
    print(f"# {machine_description()}")
    cfg = boft.BOFTConfig(block_size=args.block_size, n_factors=args.n_factors, targets=vit.TARGET_PRESETS[args.targets],
                          dropout=args.dropout)
    x = jax.random.normal(jax.random.key(1), (args.batch, *vcfg.image_size, vcfg.num_channels), jnp.float32)
    labels = jnp.arange(args.batch) % vcfg.num_labels
    train = {"deterministic": False} if args.dropout > 0 else {}  # the dropout key is an argument, as in a train step
    rows = []
    for scan in (False, True):
        base = vit.ViT(vcfg, scan_layers=scan)
        params = jax.eval_shape(base.init, jax.random.key(0), x[:1])["params"]  # shapes suffice to compile
        lo_b, co_b = timed_compile(
            jax.grad(lambda x, p, y: _loss(base.apply({"params": p}, x), y)), x, params, labels
        )
        model = boft.wrap(base, cfg)
        frozen, adapter = boft.split(jax.eval_shape(model.init, jax.random.key(0), x[:1])["params"], cfg)
        lo_a, co_a = timed_compile(
            jax.grad(lambda a, f, x, y, r: _loss(model.apply({"params": boft.combine(f, a)}, x, rngs={"dropout": r}, **train), y)),
            adapter, frozen, x, labels, jax.random.key(2),
        )
        name = "scan_layers=True" if scan else "unrolled"
        rows.append([name, "base", f"{lo_b:.1f}", f"{co_b:.1f}", "-"])
        rows.append([name, f"boft m={args.n_factors}", f"{lo_a:.1f}", f"{co_a:.1f}", f"+{co_a - co_b:.1f}"])
        print(f"  {name}: base {lo_b:.1f} + {co_b:.1f} s, boft {lo_a:.1f} + {co_a:.1f} s", flush=True)
    print()
    print(markdown_table(["layers", "gradient", "lower s", "compile s", "compile over base s"], rows))


if __name__ == "__main__":
    main()
